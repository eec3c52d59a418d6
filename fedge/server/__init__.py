"""The server side: the core wired onto a Flower ``Grid``, the MLflow registry and the run summary."""
