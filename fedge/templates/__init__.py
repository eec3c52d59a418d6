"""``fedge new NAME``: the files of a new project, kept here as package data.

``project/`` holds the templates; ``$name`` in them becomes the project's name.
The project is a folder ``NAME`` with the Python package ``NAME`` (its task
module, :mod:`fedge.contracts.task`'s interface), the scenario ``fedge.toml``
that ``fedge run`` reads there, a README with the two commands, a
``pyproject.toml`` and a test.
"""

from __future__ import annotations

import keyword
import re
import string
from importlib import resources
from importlib.resources.abc import Traversable
from importlib.util import find_spec
from pathlib import Path

#: Templates that go into the project's package (``NAME/NAME/``); the rest into ``NAME/``.
PACKAGE_FILES = ("__init__.py", "task.py", "data.py")
#: A package name that is also a scenario and model name (see fedge.contracts.config).
_NAME = re.compile(r"[a-z][a-z0-9_]*")
MAX_PROJECT_NAME = 64


class ProjectError(ValueError):
    """A project that cannot be created; the message is one line."""


def check_project_name(name: str, folder: Path | None = None) -> str:
    """Refuse a name that is not a fresh, importable Python package name.

    Raises
    ------
    ProjectError
        The name is not lower-case letters, digits and ``_`` starting with a
        letter, is a Python keyword, is too long, or is already an importable
        module (the project's package would shadow it, or be shadowed).
    """
    if len(name) > MAX_PROJECT_NAME:
        raise ProjectError(f"{name[:30]!r}...: at most {MAX_PROJECT_NAME} characters")
    if not _NAME.fullmatch(name):
        hint = re.sub(r"[^a-z0-9_]", "_", name.lower()).lstrip("_0123456789") or "myproject"
        raise ProjectError(
            f"{name!r} is not a valid project name; use lower-case letters, digits "
            f"and '_', starting with a letter (e.g. {hint!r})"
        )
    if keyword.iskeyword(name):
        raise ProjectError(f"{name!r} is a Python keyword; choose another name")
    try:
        spec = find_spec(name)
    except (ImportError, ValueError):
        spec = None
    # The (empty) target folder itself, seen as a namespace package from the cwd, is no clash.
    own = folder is not None and spec is not None and spec.origin is None and all(
        Path(loc).resolve() == folder.resolve() for loc in spec.submodule_search_locations or ()
    )
    taken = spec is not None and not own
    if taken:
        raise ProjectError(
            f"{name!r} is already an importable module here; the project's "
            "package would clash with it, choose another name"
        )
    return name


def create_project(parent: Path, name: str) -> Path:
    """Write the project ``name`` into ``parent / name`` and return that folder.

    An empty existing folder is filled; a non-empty one, or a file of that
    name, is refused and left as it was.

    Raises
    ------
    ProjectError
        The name is refused (:func:`check_project_name`), the folder exists and
        is not empty, or it cannot be written.
    """
    folder = parent / name
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir() or folder.is_symlink():
            raise ProjectError(f"{folder} exists and is not a folder; nothing was written")
        if any(folder.iterdir()):
            raise ProjectError(f"{folder} exists and is not empty; nothing was written")
    check_project_name(name, folder)
    files: dict[Path, str] = {}
    root = resources.files(__name__) / "project"
    for entry in _walk(root, ""):
        rel, text = entry
        target = rel[: -len(".tmpl")]
        dest = Path(name, target) if target in PACKAGE_FILES else Path(target)
        files[dest] = string.Template(text).substitute(name=name)
    try:
        folder.mkdir(exist_ok=True)
        for dest, text in sorted(files.items()):
            path = folder / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ProjectError(f"cannot write {folder}: {exc.strerror or exc}") from None
    return folder


def _walk(node: Traversable, prefix: str) -> list[tuple[str, str]]:
    """Every ``*.tmpl`` under ``node`` as (relative path, text)."""
    out: list[tuple[str, str]] = []
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            out += _walk(child, rel + "/")
        elif child.name.endswith(".tmpl"):
            out.append((rel, child.read_text(encoding="utf-8")))
    return out
