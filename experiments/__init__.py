"""Ready drift scenarios and the benchmark suite."""
