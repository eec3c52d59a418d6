"""How a run executes: in-process (default) or on Flower's simulation engine."""


class EngineError(RuntimeError):
    """An engine could not run the app; the message says why and where the log is."""
