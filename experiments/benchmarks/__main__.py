"""``python -m experiments.benchmarks``."""

from experiments.benchmarks.suite import main

main()
