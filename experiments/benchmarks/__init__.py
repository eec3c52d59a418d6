"""fedge benchmarks: ``fedge bench`` or ``python -m experiments.benchmarks``."""
