"""Model signing: the server seals every model version it deploys, a device checks the seal.

A *seal* binds a model's weights to its registry version: an Ed25519 signature
(``cryptography``) over a fixed domain tag, the SHA-256 digest of the weights
(:func:`weights_digest`) and the version number. A device installs a model only
when the seal verifies under the server's public key it was provisioned with;
so a model altered in flight or in the device's store, signed by another key,
relabelled as another version, or sent without a seal is refused.

Keys: the server keeps its private key in ``<output>/state/model-signing.key``
(PKCS#8 PEM, mode ``0600``) and writes the public key beside it
(``model-signing.pub``, SubjectPublicKeyInfo PEM, mode ``0644``: it is public).
A device reads the public key named by ``run.model_public_key``, or by default
that ``model-signing.pub``.

>>> import numpy as np
>>> signer = ModelSigner.generate()
>>> weights = {"w": np.ones((2, 2), dtype=np.float32)}
>>> seal = signer.seal(3, weights)
>>> verify_model(signer.verifier(), 3, weights, seal) is None
True
>>> verify_model(signer.verifier(), 4, weights, seal)
'bad-signature'
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: Registry tags recorded on every registered version.
SHA256_TAG = "fedge.model_sha256"
SIGNATURE_TAG = "fedge.signature"
SIGNING_KEY_TAG = "fedge.signing_key"
#: The version number the tagged signature covers (the number the registry was
#: expected to hand out when the version was signed).
SIGNED_VERSION_TAG = "fedge.signed_version"

PRIVATE_KEY_FILE = "model-signing.key"
PUBLIC_KEY_FILE = "model-signing.pub"

#: Separates model seals from anything else a key might ever sign.
_DOMAIN = b"fedge-model-seal-v1\x00"

#: Why a device refused a model: short codes, reported as their number (the
#: egress policy lets scalars only leave a device). 0 means "nothing refused".
REFUSAL_CODES: dict[str, int] = {
    "unsigned": 1,  # no seal came with the model
    "malformed": 2,  # a seal field is missing or not of its form
    "digest-mismatch": 3,  # the weights are not the ones the seal names
    "unknown-key": 4,  # sealed by a key other than the device's
    "bad-signature": 5,  # the signature does not verify (forged, or another version)
    "no-public-key": 6,  # the device has no server key to check with
}
REFUSAL_NAMES: dict[int, str] = {code: name for name, code in REFUSAL_CODES.items()}


class SigningKeyError(ValueError):
    """A signing key file is missing, unreadable or not an Ed25519 key (one line)."""


def weights_digest(weights: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 over every array's name, dtype, shape and bytes, in sorted name order.

    Insertion order does not matter; any change to a name, a dtype, a shape or
    a single byte does.

    Parameters
    ----------
    weights : mapping of str to numpy.ndarray
        The model's arrays.

    Returns
    -------
    bytes
        The 32-byte digest.
    """
    h = hashlib.sha256(b"fedge-weights-v1\x00")
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        encoded = name.encode("utf-8")
        dtype = array.dtype.str.encode("ascii")  # includes the byte order, e.g. "<f4"
        # Every field is length-prefixed, so no two different models hash the same stream.
        h.update(len(encoded).to_bytes(8, "little") + encoded)
        h.update(len(dtype).to_bytes(8, "little") + dtype)
        h.update(array.ndim.to_bytes(8, "little"))
        for dim in array.shape:
            h.update(int(dim).to_bytes(8, "little"))
        h.update(array.nbytes.to_bytes(8, "little"))
        h.update(array.tobytes())
    return h.digest()


def _message(digest: bytes, version: int) -> bytes:
    return _DOMAIN + digest + int(version).to_bytes(8, "big", signed=True)


def key_fingerprint(public: Ed25519PublicKey) -> str:
    """First 16 bytes of the SHA-256 of the raw public key, as hex."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class ModelSeal:
    """What travels with a model: its digest, the signature and the signing key.

    Parameters
    ----------
    sha256 : str
        Hex digest of the weights (:func:`weights_digest`).
    signature : str
        Hex Ed25519 signature over the digest and the version.
    key : str
        Fingerprint of the signing key (:func:`key_fingerprint`).
    """

    sha256: str
    signature: str
    key: str

    def to_dict(self) -> dict[str, str]:
        """Plain strings (a Flower ``ConfigRecord`` or a JSON object holds them)."""
        return {"sha256": self.sha256, "signature": self.signature, "key": self.key}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelSeal | None:
        """A seal from :meth:`to_dict`; None when a field is missing or not a string."""
        values = [data.get(k) for k in ("sha256", "signature", "key")]
        if not all(isinstance(v, str) for v in values):
            return None
        return cls(*values)  # type: ignore[arg-type]


class ModelVerifier:
    """Checks model seals against one public key.

    Parameters
    ----------
    public : Ed25519PublicKey
        The server's model-signing key.
    """

    def __init__(self, public: Ed25519PublicKey) -> None:
        self.public = public
        self.fingerprint = key_fingerprint(public)

    def __repr__(self) -> str:
        return f"ModelVerifier(fingerprint={self.fingerprint!r})"

    @classmethod
    def from_file(cls, path: Path) -> ModelVerifier:
        """Read a PEM public key file.

        Raises
        ------
        SigningKeyError
            If the file is missing, unreadable or not an Ed25519 public key.
        """
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except OSError as exc:
            raise SigningKeyError(f"model public key {path}: {exc.strerror or exc}") from None
        except ValueError:
            raise SigningKeyError(f"model public key {path}: not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"model public key {path}: not an Ed25519 key")
        return cls(key)

    def check(self, version: int, weights: Mapping[str, np.ndarray], seal: ModelSeal | None) -> str | None:
        """Why ``weights`` may not be installed as ``version`` (a refusal name), or None.

        The cheap checks come first; the digest is recomputed from the weights
        received, never taken from the seal alone.
        """
        if seal is None:
            return "unsigned"
        try:
            claimed = bytes.fromhex(seal.sha256)
            signature = bytes.fromhex(seal.signature)
        except ValueError:
            return "malformed"
        if len(claimed) != 32 or len(signature) != 64:
            return "malformed"
        if seal.key != self.fingerprint:
            return "unknown-key"
        digest = weights_digest(weights)
        if digest != claimed:
            return "digest-mismatch"
        try:
            self.public.verify(signature, _message(digest, version))
        except InvalidSignature:
            return "bad-signature"
        return None


def verify_model(
    verifier: ModelVerifier | None,
    version: int,
    weights: Mapping[str, np.ndarray],
    seal: ModelSeal | None,
) -> str | None:
    """:meth:`ModelVerifier.check`, refusing everything (``no-public-key``) without a verifier."""
    if verifier is None:
        return "no-public-key"
    return verifier.check(version, weights, seal)


class ModelSigner:
    """Seals model versions with one Ed25519 private key.

    Parameters
    ----------
    private : Ed25519PrivateKey
        The server's model-signing key.
    """

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.fingerprint = key_fingerprint(private.public_key())

    def __repr__(self) -> str:
        return f"ModelSigner(fingerprint={self.fingerprint!r})"

    @classmethod
    def generate(cls) -> ModelSigner:
        """A signer with a fresh key (kept in memory only)."""
        return cls(Ed25519PrivateKey.generate())

    def seal(self, version: int, weights: Mapping[str, np.ndarray]) -> ModelSeal:
        """Sign ``weights`` as ``version``."""
        digest = weights_digest(weights)
        signature = self.private.sign(_message(digest, version))
        return ModelSeal(digest.hex(), signature.hex(), self.fingerprint)

    def verifier(self) -> ModelVerifier:
        """The matching verifier (what a device holds)."""
        return ModelVerifier(self.private.public_key())

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def save(self, state_dir: Path) -> None:
        """Write the private key (``0600``) and the public key (``0644``) into ``state_dir``.

        The private key file is created exclusively: an existing key is never
        overwritten (devices trust it).

        Raises
        ------
        FileExistsError
            If ``state_dir`` already holds a private key.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        private = state_dir / PRIVATE_KEY_FILE
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        _write_public(state_dir / PUBLIC_KEY_FILE, self.public_pem())

    @classmethod
    def load(cls, state_dir: Path) -> ModelSigner:
        """Read the private key of ``state_dir``.

        Raises
        ------
        SigningKeyError
            If the key is unreadable, not Ed25519, or readable by others than its owner.
        """
        path = Path(state_dir) / PRIVATE_KEY_FILE
        try:
            mode = path.stat().st_mode & 0o777
            pem = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"model signing key {path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            raise SigningKeyError(
                f"model signing key {path}: mode {mode:o} lets others read it; "
                "chmod 600 it (or move it away to start a new key)"
            )
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except OSError as exc:
            raise SigningKeyError(f"model signing key {path}: {exc.strerror or exc}") from None
        except (ValueError, TypeError):
            raise SigningKeyError(f"model signing key {path}: not an unencrypted PEM key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"model signing key {path}: not an Ed25519 key")
        return cls(key)


def _write_public(path: Path, pem: bytes) -> None:
    """Write the public key by temporary file and rename (a device never reads half a key)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


_SIGNERS: dict[Path, ModelSigner] = {}
_SIGNERS_LOCK = threading.Lock()


def server_signer(state_dir: Path) -> ModelSigner:
    """The server's signer for ``state_dir``: loaded, or created on first use (cached).

    The public key file is rewritten when it is missing or does not match the
    private key, so the default device path always names the key in use.

    Raises
    ------
    SigningKeyError
        If an existing private key cannot be used.
    """
    state_dir = Path(state_dir).resolve()
    with _SIGNERS_LOCK:
        found = _SIGNERS.get(state_dir)
        if found is not None:
            return found
        if (state_dir / PRIVATE_KEY_FILE).exists():
            signer = ModelSigner.load(state_dir)
        else:
            signer = ModelSigner.generate()
            try:
                signer.save(state_dir)
            except FileExistsError:  # another process made one meanwhile: use that
                signer = ModelSigner.load(state_dir)
        public = state_dir / PUBLIC_KEY_FILE
        pem = signer.public_pem()
        try:
            current = public.read_bytes()
        except OSError:
            current = b""
        if current != pem:
            _write_public(public, pem)
        _SIGNERS[state_dir] = signer
        return signer


def public_key_path(output_dir: Path, configured: str = "") -> Path:
    """Where a device finds the server's public key: ``configured``, else the state dir's."""
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(output_dir) / "state" / PUBLIC_KEY_FILE


def signing_state_dir(output_dir: Path) -> Path:
    """The folder holding the server's model-signing key: ``<output>/state``."""
    return Path(output_dir) / "state"
