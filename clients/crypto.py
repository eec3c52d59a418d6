"""Encryption at rest on the device: the per-device key file and AES-GCM record sealing.

Each record (one sample row of the store, say) is sealed on its own with AES-256-GCM
from ``cryptography``: a fresh random 96-bit nonce per record, and associated data that
names the record (its kind, id and tick), so a record copied over another one, or moved
to another row, fails to open instead of being read as the other one's data.

The 256-bit key lives in a key file of its own, one per device: by default next to the
store (``device-3.sqlite`` -> ``device-3.key``), created with mode ``0600`` on first
use; a real device can keep it elsewhere (another disk, a secrets mount) by naming the
file in ``FEDGE_DEVICE_KEY_FILE``. A key file that others may read is refused.

The helpers that create owner-only files and folders (:func:`private_dirs`,
:func:`private_file`) are here too, so every device component that persists samples,
keys or stores makes them the same way.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: Environment variable naming the key file; ``{store}`` in it becomes the store's
#: file name without suffix (``device-3``), so one setting serves several devices.
KEY_FILE_ENV = "FEDGE_DEVICE_KEY_FILE"

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
#: Bytes a sealed record adds to its plaintext: the nonce in front, the tag behind.
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES

#: Records one key may seal with random 96-bit nonces before a repeated nonce stops
#: being negligible (NIST SP 800-38D, section 8.3).
RECORDS_PER_KEY = 2**32

_OTHERS = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(ValueError):
    """A key file cannot be used: missing folder, loose permissions, malformed content."""


class WrongKeyError(KeyFileError):
    """The key file holds a valid key, but not the one the store was sealed with."""


class RecordAuthenticationError(ValueError):
    """A sealed record did not open: wrong key, or its bytes (or its place) were changed.

    ``index`` is the position of the record that failed in an :meth:`RecordCipher.open_many`
    call (0 for :meth:`RecordCipher.open`).
    """

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


def default_key_path(store: str | Path) -> Path:
    """The key file of the store at ``store``.

    ``FEDGE_DEVICE_KEY_FILE`` wins when set (with ``{store}`` replaced by the store's
    file name without suffix); otherwise the key sits next to the store, with the
    suffix ``.key``.

    Parameters
    ----------
    store
        Path of the device store: ``run/devices/device-3.sqlite`` has the key file
        ``run/devices/device-3.key`` (with ``FEDGE_DEVICE_KEY_FILE`` unset).
    """
    store = Path(store)
    configured = os.environ.get(KEY_FILE_ENV, "").strip()
    if configured:
        return Path(configured.replace("{store}", store.stem)).expanduser()
    if store.suffix == ".key":  # never let the key and the store share a name
        return store.with_name(store.name + ".key")
    return store.with_suffix(".key")


def private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents with mode ``0700``.

    Folders that already exist are left as they are: they may be the user's own
    (a home folder, ``/var/lib``), whose permissions are not ours to change.
    """
    missing: list[Path] = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            path.mkdir(mode=0o700)
        # mkdir's mode passes through the umask, which may have taken more bits away;
        # chmod sets exactly owner-only.
        os.chmod(path, 0o700)


def private_file(path: Path) -> None:
    """Make sure ``path`` exists and is readable by its owner only (mode ``0600``).

    A new file is created empty with mode ``0600`` from the start (it is never
    readable by others, not even for a moment); an existing one is tightened to
    ``0600``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def tighten(path: Path) -> None:
    """Drop group and world permissions of ``path`` if it exists (files fedge made)."""
    with contextlib.suppress(FileNotFoundError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & _OTHERS:
            os.chmod(path, mode & ~_OTHERS)


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return AESGCM.generate_key(bit_length=8 * KEY_BYTES)


def write_key_file(path: Path, key: bytes) -> bool:
    """Write ``key`` to ``path`` (mode ``0600``) unless a key file is already there.

    The key is written to a temporary file, synced, and linked into place, so a
    reader never sees half a key and two processes creating the same key at once
    agree on one of them.

    Returns
    -------
    bool
        ``True`` if this call created the file, ``False`` if one was there already.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"key: expected {KEY_BYTES} bytes, got {len(key)}")
    private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    # A lost key is every sample lost: make the new name itself durable.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def read_key_file(path: Path) -> bytes:
    """Read the key in ``path``: 64 hexadecimal digits on one line.

    Raises
    ------
    KeyFileError
        If the file is missing, is readable or writable by group or others, or does
        not hold a 256-bit key.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _OTHERS:
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {mode:04o}); "
            f"refusing to use it: run `chmod 600 {path}`"
        )
    try:
        text = path.read_bytes().decode("ascii").strip()
        key = bytes.fromhex(text)
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(
            f"key file {path} does not hold a key ({2 * KEY_BYTES} hexadecimal digits)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read: {exc.strerror or exc}") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds a {8 * len(key)}-bit key, expected {8 * KEY_BYTES} bits"
        )
    return key


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """The key in ``path``, created first (mode ``0600``) if there is no such file.

    Returns
    -------
    key : bytes
        The 256-bit key.
    created : bool
        Whether this call made the key (so nothing sealed before can open with it).

    Raises
    ------
    KeyFileError
        See :func:`read_key_file`.
    """
    created = False
    if not path.exists() and not path.is_symlink():
        try:
            created = write_key_file(path, new_key())
        except OSError as exc:
            raise KeyFileError(f"key file {path} cannot be created: {exc.strerror or exc}") from None
    return read_key_file(path), created


class RecordCipher:
    """AES-256-GCM sealing of small records, each bound to its associated data.

    Parameters
    ----------
    key
        The 256-bit key.

    Examples
    --------
    >>> cipher = RecordCipher(new_key())
    >>> sealed = cipher.seal(b"row", b"sample 1")
    >>> cipher.open(sealed, b"sample 1")
    b'row'
    >>> cipher.open(sealed, b"sample 2")
    Traceback (most recent call last):
    ...
    clients.crypto.RecordAuthenticationError: record failed authentication
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"key: expected {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        """``nonce || ciphertext || tag`` of ``plaintext``, bound to ``associated``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def seal_many(self, plaintexts: list[bytes], associated: list[bytes]) -> list[bytes]:
        """:meth:`seal` of each pair, drawing all the nonces in one call."""
        nonces = os.urandom(NONCE_BYTES * len(plaintexts))
        encrypt = self._aead.encrypt
        out = []
        for i, (plain, aad) in enumerate(zip(plaintexts, associated, strict=True)):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            out.append(nonce + encrypt(nonce, plain, aad))
        return out

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext of a :meth:`seal` result.

        Raises
        ------
        RecordAuthenticationError
            If the record was sealed under another key or associated data, or any of
            its bytes changed.
        """
        if len(sealed) < SEAL_OVERHEAD:
            raise RecordAuthenticationError("record failed authentication (too short)")
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated)
        except InvalidTag:
            raise RecordAuthenticationError("record failed authentication") from None

    def open_many(self, sealed: list[bytes], associated: list[bytes]) -> list[bytes]:
        """:meth:`open` of each pair (a window of samples is read in one go).

        Raises
        ------
        RecordAuthenticationError
            For the first record that does not open; its ``index`` says which.
        """
        decrypt = self._aead.decrypt
        out = []
        i = 0
        try:
            for i, (blob, aad) in enumerate(zip(sealed, associated, strict=True)):
                # Plain bytes slices: cheaper here than memoryviews for records this small.
                out.append(decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad))
        except InvalidTag:
            raise RecordAuthenticationError("record failed authentication", i) from None
        except ValueError:  # shorter than a nonce: cryptography refuses the nonce size
            raise RecordAuthenticationError("record failed authentication (too short)", i) from None
        return out

    def __repr__(self) -> str:
        return "RecordCipher(key=<hidden>)"
