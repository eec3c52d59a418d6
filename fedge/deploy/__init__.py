"""A local Flower deployment: TLS certificates, SuperNode keys, and the processes.

``fedge deploy`` starts a SuperLink, one SuperNode per device, an MLflow
tracking server and the run, all on this machine, with TLS and SuperNode
authentication on unless the caller asks for plain text.
"""

from __future__ import annotations

from fedge.engines import EngineError


class DeployError(EngineError):
    """A deployment could not start or finish; the message says why in one line."""
