"""App pinning on the device: a SuperNode runs only the Flower app it was provisioned with.

Flower 1.42's own app verification (``flower-supernode --trusted-entities``)
accepts only FABs signed by Flower Hub; a FAB uploaded with ``flwr run <dir>``
carries no signature, so with trusted entities set every local app is refused,
and without them every app is accepted. fedge therefore pins apps by the
SHA-256 of the FAB (the hash Flower itself names the FAB by; ``flwr build`` is
deterministic, so the operator computes it with :func:`fab_sha256` or
``python -m clients.app_pin hash <app dir or .fab>``).

The check has to happen before any code of the app is imported: a ClientApp
that checked its own hash would be replaced, check and all, by the app it is
meant to refuse. The SuperNode's executor starts ``flwr-clientapp`` from
``PATH`` for every message; :func:`write_shim` writes a ``flwr-clientapp`` that
fedge puts first on the SuperNode's ``PATH``. It runs Flower's own
``flwr-clientapp`` with one change: the FAB is checked against the pinned
hashes (:data:`PIN_ENV`) before Flower installs or loads it. A FAB that is not
pinned is never unpacked; one line names it in the SuperNode's log, and Flower
answers the run's message with an error whose reason says why.

The pins are read from the environment of the SuperNode (inherited by its
executor); no pin means every app is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

PIN_ENV = "FEDGE_PINNED_APPS"
"""Environment variable with the SHA-256 (hex) of each FAB the device may run, comma separated."""

SHIM_NAME = "flwr-clientapp"

_HEX = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger("fedge.app_pin")


class AppNotProvisioned(RuntimeError):
    """The run's app is not one this device was provisioned with."""


class PinError(ValueError):
    """A pin is not a SHA-256 hex digest."""


def parse_pins(value: str | None) -> frozenset[str]:
    """The pinned hashes in ``value`` (``PIN_ENV``'s format).

    Raises
    ------
    PinError
        If an entry is not 64 hexadecimal characters.
    """
    pins = set()
    for item in (value or "").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if not _HEX.match(item):
            raise PinError(f"{PIN_ENV}: {item[:80]!r} is not a SHA-256 hex digest")
        pins.add(item)
    return frozenset(pins)


def fab_sha256(app: Path) -> str:
    """SHA-256 (hex) of the FAB that ``flwr run`` builds from ``app``, or of a built ``.fab`` file."""
    app = Path(app).expanduser().resolve()
    if app.is_file():
        return hashlib.sha256(app.read_bytes()).hexdigest()
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def check_fab(content: bytes, pins: Iterable[str]) -> str:
    """Return the FAB's hash if it is pinned; otherwise log one line and raise.

    Raises
    ------
    AppNotProvisioned
        Naming the FAB's hash and, briefly, what was pinned.
    """
    digest = hashlib.sha256(content).hexdigest()
    allowed = frozenset(pins)
    if digest in allowed:
        return digest
    pinned = ", ".join(sorted(p[:12] for p in allowed)) or "none"
    reason = (
        f"refused app {digest[:12]}: not the app this device was provisioned for "
        f"(pinned: {pinned}); nothing of it was installed or run"
    )
    log.error("%s", reason)
    raise AppNotProvisioned(reason)


class _NoTraceback(logging.Filter):
    """Flower logs a ClientApp's exception with its traceback; a refusal needs no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        if info and isinstance(info, tuple) and isinstance(info[1], AppNotProvisioned):
            record.exc_info = None
            record.exc_text = None
        return True


def _guard(install: Callable[..., object], pins: frozenset[str]) -> Callable[..., object]:
    def guarded(fab_file: bytes, *args: object, **kwargs: object) -> object:
        check_fab(fab_file, pins)
        return install(fab_file, *args, **kwargs)

    return guarded


def main() -> None:
    """``flwr-clientapp`` with the FAB checked against the pins before it is installed."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    # Flower's own modules (the package exports a function of the same name as the
    # CLI module); the install step is looked up in run_clientapp at call time.
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    try:
        pins = parse_pins(os.environ.get(PIN_ENV))
    except PinError as exc:
        log.error("%s; every app is refused", exc)
        pins = frozenset()
    if not callable(getattr(runtime, "install_from_fab", None)):
        # Fail closed: without the hook there is no way to check before the app runs.
        log.error("this Flower has no install_from_fab to check; refusing to run any app")
        raise SystemExit(1)
    logging.getLogger("flwr").addFilter(_NoTraceback())
    runtime.install_from_fab = _guard(runtime.install_from_fab, pins)  # type: ignore[assignment]
    cli.flwr_clientapp()


def write_shim(folder: Path, python: str | None = None) -> Path:
    """Write the pinning ``flwr-clientapp`` into ``folder`` (mode ``0700``) and return its path.

    Put ``folder`` first on the SuperNode's ``PATH`` and set :data:`PIN_ENV`
    in its environment.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / SHIM_NAME
    body = (
        f"#!{python or sys.executable}\n"
        "# Written by fedge: Flower's flwr-clientapp, refusing apps that are not pinned.\n"
        "from clients.app_pin import main\n"
        "main()\n"
    )
    tmp = folder / f".{SHIM_NAME}.tmp"
    tmp.write_text(body, encoding="utf-8")
    os.chmod(tmp, stat.S_IRWXU)
    os.replace(tmp, path)
    return path


def _cli(argv: list[str]) -> int:
    usage = "usage: python -m clients.app_pin hash <app dir or .fab> | shim <folder>"
    if len(argv) != 2 or argv[0] not in ("hash", "shim"):
        print(usage, file=sys.stderr)
        return 2
    target = Path(argv[1])
    if argv[0] == "hash":
        if not target.exists():
            print(f"app_pin: error: {target} does not exist", file=sys.stderr)
            return 2
        try:
            print(fab_sha256(target))
        except (OSError, ValueError) as exc:
            print(f"app_pin: error: {target}: {exc}".splitlines()[0], file=sys.stderr)
            return 2
        return 0
    print(write_shim(target))
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
