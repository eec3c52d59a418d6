"""The app with fedge's monitoring added: what ``run.client_app`` or ``clientapp`` names."""

from clients.flower_app import with_fedge
from digitsexample.client_app import app as flower_app

app = with_fedge(flower_app, task="digitsexample.fedge_task")
