"""What every benchmark shares: the figure record, timers, the machine, small scenarios."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedge.contracts.config import FedgeConfig
from fedge.contracts.config_load import load_config


@dataclass
class Figure:
    """One measured figure of a benchmark.

    Parameters
    ----------
    item : str
        The benchmark it belongs to (``"engine"``, ``"overhead"``, ...).
    name : str
        What was measured.
    value : str
        The measurement, formatted with its unit.
    ratio : str
        The side-by-side ratio measured in the same run ("" when there is none).
    target : str
        The goal, in words ("" when there is none).
    met : bool or None
        Whether the goal is met (None when there is no goal).
    """

    item: str
    name: str
    value: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    """Best wall time of ``repeat`` calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, OS, Python and the versions of the libraries measured."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if found:
            cpu = found.group(1).strip()
    ram = "-"
    with contextlib.suppress(OSError, AttributeError):
        kib = int(re.findall(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[0])
        ram = f"{kib / 1024**2:.1f} GiB"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": str(cores),
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "flwr": _package_version("flwr"),
        "torch": _package_version("torch"),
        "numpy": _package_version("numpy"),
        "ray": _package_version("ray"),
        "mlflow": _package_version("mlflow"),
        "river": _package_version("river"),
        "load": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def small_config(out: Path, *overrides: str) -> tuple[FedgeConfig, tuple[str, ...]]:
    """A one-tick stationary SINE-2 run: one poll, then one campaign of the initial rounds."""
    given = (
        "scenario.ticks=1",
        'scenario.schedule.kind="stationary"',
        "scenario.bad_row_fraction=0.0",
        "run.resume=false",
        f'run.output_dir="{out}"',
        *overrides,
    )
    return load_config(None, given), given


class StrategyTimer(logging.Handler):
    """Collects the time Flower's strategy reports for its rounds (its own clock).

    Flower logs ``Strategy execution finished in <s>s`` after the last round; on the
    simulation engine the same line is in the run's log file (see :func:`strategy_seconds`).
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []
        #: CPU seconds this process spent between the strategy's start and finish lines
        #: (all its threads; a shared machine's other jobs do not count).
        self.cpu_seconds: list[float] = []
        self._cpu_started: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _STRATEGY_START.match(message):
            self._cpu_started = time.process_time()
            return
        found = _STRATEGY_TIME.search(message)
        if found:
            self.seconds.append(float(found.group(1)))
            if self._cpu_started is not None:
                self.cpu_seconds.append(time.process_time() - self._cpu_started)
                self._cpu_started = None


_STRATEGY_START = re.compile(r"Starting \w+ strategy")
_STRATEGY_TIME = re.compile(r"Strategy execution finished in ([0-9.]+)s")


def strategy_seconds(log_text: str) -> list[float]:
    """Every strategy execution time in a Flower log."""
    return [float(s) for s in _STRATEGY_TIME.findall(log_text)]


@contextlib.contextmanager
def flower_strategy_timer() -> Iterator[StrategyTimer]:
    """Capture Flower's strategy timings in this process without printing Flower's INFO lines."""
    logger = logging.getLogger("flwr")
    timer = StrategyTimer()
    saved_level, saved_propagate = logger.level, logger.propagate
    saved = [(h, h.level) for h in logger.handlers]
    for handler, _ in saved:
        handler.setLevel(logging.WARNING)
    logger.addHandler(timer)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield timer
    finally:
        logger.removeHandler(timer)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate
        for handler, level in saved:
            handler.setLevel(level)


def write_bare_data(cfg: FedgeConfig, folder: Path) -> Path:
    """Each node's tick-0 rows as ``device-<pid>.npz``, the data the bare ClientApp trains on."""
    from fedge.scenarios import build_scenario

    scenario = build_scenario(cfg.scenario)
    folder.mkdir(parents=True, exist_ok=True)
    for pid in range(cfg.scenario.clients):
        x, y = scenario.batch(pid, 0)
        np.savez(folder / f"device-{pid}.npz", x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    return folder
