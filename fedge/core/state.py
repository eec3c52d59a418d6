"""The orchestrator's state on disk: one small JSON file per model, replaced atomically.

:class:`JsonState` is the :class:`fedge.core.orchestrator.StateStore` the ServerApp
uses. Each save writes a temporary file beside the target, flushes it to disk
and renames it over the old one, so a crash at any moment leaves either the
previous state or the new one, never half of either. A file that cannot be read
is moved aside (``<name>.corrupt-<timestamp>``) with a warning and the run
starts as if there were none: nothing already in the registry is lost, the
registry's champion is still where a resumed run starts from.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> state = JsonState(Path(tempfile.mkdtemp()) / "state" / "fedge-demo.json")
>>> state.load() is None
True
>>> state.save({"rounds_done": 8, "tick": 3})
>>> state.load()
{'rounds_done': 8, 'tick': 3}
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("fedge.server")


def state_path(output_dir: Path, model_name: str) -> Path:
    """Where the state of ``model_name``'s runs lives: ``<output dir>/state/<model>.json``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name) or "model"
    return Path(output_dir) / "state" / f"{safe}.json"


class JsonState:
    """A JSON object in one file, saved by write-to-temporary and rename.

    Parameters
    ----------
    path : Path
        The file; its folder is created on the first save.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JsonState(path={str(self.path)!r})"

    def load(self) -> dict[str, Any] | None:
        """The saved object, or None when there is no (readable) file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except ValueError as exc:
            self._move_aside(" ".join(str(exc).split())[:200])
            return None
        if not isinstance(data, dict):
            self._move_aside(f"expected a JSON object, got {type(data).__name__}")
            return None
        return data

    def _move_aside(self, reason: str) -> None:
        target = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(self.path, target)
        log.warning(
            "orchestrator state %s is unreadable (%s); moved it to %s and starting without it",
            self.path,
            reason,
            target,
        )

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the file with ``state`` in one step."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(state), indent=2, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:
            # The rename itself must reach the disk too.
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
