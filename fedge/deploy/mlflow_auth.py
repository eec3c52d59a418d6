"""Credentials for MLflow's basic-auth app, so that only fedge and its operator move the champion.

``mlflow server --app-name basic-auth`` (MLflow 3, needs ``Flask-WTF``) refuses
every request without a user name and password (``401``), the registry's
``champion`` alias included. Its settings come from an INI file named by
``MLFLOW_AUTH_CONFIG_PATH``; on first start it creates the admin user with the
password given there, and keeps its users in its own SQLite database.

:func:`ensure_mlflow_auth` writes that file once, with a random password, into
a folder only the owner can enter; later deployments reuse it, so the user
database and the password stay in step.
"""

from __future__ import annotations

import configparser
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fedge.deploy import DeployError
from fedge.deploy.certs import write_private

USERNAME = "fedge"


@dataclass(frozen=True)
class MlflowAuth:
    """Where the basic-auth settings are and what the clients send.

    Parameters
    ----------
    config : Path
        The INI file for ``MLFLOW_AUTH_CONFIG_PATH`` (mode ``0600``).
    username, password : str
        The admin user the server creates on first start; fedge's ServerApp
        logs in with it (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``).
    secret_key : str
        Flask's secret (``MLFLOW_FLASK_SERVER_SECRET_KEY``, for CSRF on the sign-up page).
    """

    config: Path
    username: str
    password: str
    secret_key: str

    def server_env(self) -> dict[str, str]:
        """Environment for ``mlflow server --app-name basic-auth``."""
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(self.config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
        }

    def client_env(self) -> dict[str, str]:
        """Environment for an MLflow client (the ServerApp) that logs in as the admin."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def ensure_mlflow_auth(folder: Path) -> MlflowAuth:
    """Create (or read) the basic-auth settings in ``folder`` (mode ``0700``).

    Raises
    ------
    DeployError
        If an existing settings file cannot be read or lacks the admin's password.
    """
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / "basic_auth.ini"
    key_path = folder / "flask-secret"
    if not path.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        parser["mlflow"] = {
            # Nobody but the admin may read or write anything unless granted.
            "default_permission": "NO_PERMISSIONS",
            "database_uri": f"sqlite:///{folder / 'users.db'}",
            "admin_username": USERNAME,
            "admin_password": secrets.token_urlsafe(24),
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        }
        lines: list[str] = ["[mlflow]"]
        lines += [f"{k} = {v}" for k, v in parser["mlflow"].items()]
        write_private(path, ("\n".join(lines) + "\n").encode())
    if not key_path.is_file():
        write_private(key_path, secrets.token_hex(32).encode())
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
        section = parser["mlflow"]
        username, password = section["admin_username"], section["admin_password"]
    except (configparser.Error, KeyError, OSError) as exc:
        raise DeployError(f"{path}: not a usable MLflow basic-auth file ({exc})") from None
    if not username or not password:
        raise DeployError(f"{path}: admin_username and admin_password must be set")
    return MlflowAuth(path, username, password, key_path.read_text(encoding="utf-8").strip())
