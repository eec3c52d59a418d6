"""What several tests share: scikit-learn's bundled digits, and test modules importable everywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 bundled 8x8 digits as flat float32 rows in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def importable(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Modules in ``folder`` importable here and in every process a run starts."""
    monkeypatch.syspath_prepend(str(folder))
    paths = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
