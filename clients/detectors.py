"""river's drift detector classes, loaded without the rest of ``river.drift``.

Importing ``river.drift`` runs its package ``__init__``, which also imports
river's synthetic drift datasets and its retraining classifier, and those pull in
scikit-learn, SciPy and pandas: about 190 MB and several seconds on a small
device. A device needs one detector class. :func:`detector_class` loads the
river module that defines it as a module of its own, so only what that module
itself imports is loaded (ADWIN: river's Rust core and ``river.base``; KSWIN
brings SciPy, which its test needs; the others ``river.stats``).

In a process that has already imported ``river.drift`` (the server side of the
in-process engine) river's own classes are used, so one process never holds two
copies of a class.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

#: Canonical detector name -> (file under river's package, class name).
_SOURCES: dict[str, tuple[str, str]] = {
    "ADWIN": ("drift/adwin.py", "ADWIN"),
    "KSWIN": ("drift/kswin.py", "KSWIN"),
    "PageHinkley": ("drift/page_hinkley.py", "PageHinkley"),
    "DDM": ("drift/binary/ddm.py", "DDM"),
    "EDDM": ("drift/binary/eddm.py", "EDDM"),
    "HDDM_A": ("drift/binary/hddm_a.py", "HDDMA"),
    "HDDM_W": ("drift/binary/hddm_w.py", "HDDMW"),
}

DETECTOR_NAMES: tuple[str, ...] = tuple(_SOURCES)
"""Canonical names of the supported detectors."""

_PREFIX = "clients._river_detector_"


def _from_loaded_river(name: str) -> Any | None:
    drift = sys.modules.get("river.drift")
    if drift is None:
        return None
    _, cls = _SOURCES[name]
    owner = drift if name in ("ADWIN", "KSWIN", "PageHinkley") else getattr(drift, "binary", None)
    return getattr(owner, cls, None)


def _load_alone(relative: str) -> ModuleType:
    module_name = _PREFIX + relative.replace("/", "_").removesuffix(".py")
    found = sys.modules.get(module_name)
    if found is not None:
        return found
    spec = importlib.util.find_spec("river")
    if spec is None or spec.origin is None:
        raise ImportError("river is not installed")
    path = Path(spec.origin).parent / relative
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load river's {relative}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def detector_class(name: str) -> type:
    """river's class for the detector called ``name`` (a canonical name of :data:`DETECTOR_NAMES`).

    >>> detector_class("ADWIN").__name__
    'ADWIN'
    """
    if name not in _SOURCES:
        raise KeyError(name)
    cls = _from_loaded_river(name)
    if cls is None:
        relative, attr = _SOURCES[name]
        cls = getattr(_load_alone(relative), attr)
    return cls  # type: ignore[no-any-return]
