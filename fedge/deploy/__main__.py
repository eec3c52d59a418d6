"""``python -m fedge.deploy``: the ``fedge deploy`` command on its own."""

from __future__ import annotations

import typer

import fedge  # noqa: F401  (telemetry defaults before Flower or MLflow load)
from fedge.deploy.command import deploy_cmd

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(deploy_cmd)

if __name__ == "__main__":
    app()
