"""SuperNode authentication keys: one EC key pair per SuperNode, in OpenSSH format.

Flower's SuperNode signs its requests with the private key
(``flower-supernode --auth-supernode-private-key``); the SuperLink, started
with ``--enable-supernode-auth``, accepts only nodes whose public key was
registered with ``flwr supernode register <public key>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.deploy.certs import write_private


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key files.

    Parameters
    ----------
    private : Path
        OpenSSH private key (mode ``0600``), handed to the SuperNode.
    public : Path
        OpenSSH public key (``ecdsa-sha2-nistp384 ...``), registered with the SuperLink.
    """

    private: Path
    public: Path


def create_node_key(folder: Path, name: str, *, comment: str = "") -> NodeKey:
    """Create (or reuse) the key pair ``<folder>/<name>`` and ``<folder>/<name>.pub``.

    Parameters
    ----------
    folder : Path
        Where the keys go; created if missing.
    name : str
        File name of the private key, e.g. ``"device-0"``.
    comment : str, default ""
        Appended to the public key line (an OpenSSH key comment).

    Returns
    -------
    NodeKey
        Paths of the private and public key.
    """
    key = NodeKey(folder / name, folder / f"{name}.pub")
    if key.private.is_file() and key.public.is_file():
        return key
    private = ec.generate_private_key(ec.SECP384R1())
    write_private(
        key.private,
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    line = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key.public.write_bytes(line + (f" {comment}".encode() if comment else b"") + b"\n")
    return key
