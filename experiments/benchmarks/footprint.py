"""Item 4: what a device costs: memory of its process, detector time, store I/O.

Memory is measured in fresh child processes (``python -m
experiments.benchmarks.footprint fedge|bare``): each builds one node's
ClientApp, serves a monitoring tick (fedge only: bare has no monitoring) and a
training round, and reports its resident set from ``/proc/self/status``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.benchmarks.common import Figure, best_of, small_config


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(kind: str) -> None:
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedge.contracts import model as nets
    from fedge.contracts import protocol as p
    from fedge.contracts.wire import to_arrays
    from fedge.engines.inprocess import InProcessGrid
    from fedge.runner import RunRequest
    from fedge.scenarios import build_scenario

    with tempfile.TemporaryDirectory() as tmp:
        cfg, overrides = small_config(Path(tmp), "scenario.clients=1")
        scenario = build_scenario(cfg.scenario)
        weights = nets.initial_weights(
            nets.build_model(scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers),
            0,
        )
        if kind == "fedge":
            from clients.client_app import app

            folder = Path(tmp) / "run"
            run_config = RunRequest(None, overrides, "inprocess").run_config(cfg, folder, "inprocess")
            grid = InProcessGrid(app, 1, run_config)
            query = RecordDict({p.CONFIG: ConfigRecord({p.TICK: 0, p.CHAMPION_VERSION: 0})})
            grid.send_and_receive([Message(query, 1000, "query", group_id="tick-0")])
        else:
            from experiments.benchmarks import bare_app

            bare_app.configure(cfg)
            grid = InProcessGrid(bare_app.app, 1, {})
        c = cfg.campaign
        train = RecordDict(
            {
                p.ARRAYS: to_arrays(weights),
                p.CONFIG: ConfigRecord(
                    {
                        p.LOCAL_EPOCHS: c.local_epochs,
                        p.LR: c.lr,
                        p.BATCH_SIZE: c.batch_size,
                        p.SEED: 0,
                        p.TICK: 0,
                        p.ROUND: 1,
                    }
                ),
            }
        )
        replies = list(grid.send_and_receive([Message(train, 1000, "train", group_id="r1")]))
        assert replies and not replies[0].has_error(), replies
        print(json.dumps({"rss_kib": _status_kib("VmRSS"), "hwm_kib": _status_kib("VmHWM")}))


def _memory(kind: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.footprint", kind],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def detector_cost(name: str, n: int = 20_000) -> float:
    """Microseconds per sample of the drift monitor with detector ``name``."""
    from clients.monitor import DriftMonitor

    rng = np.random.default_rng(0)
    errors = np.r_[rng.random(n // 2) < 0.1, rng.random(n - n // 2) < 0.4]
    monitor = DriftMonitor(name, seed=0)
    started = time.perf_counter()
    for chunk in np.array_split(errors, n // 100):  # ticks of 100 samples, as on a device
        monitor.update(chunk)
    return 1e6 * (time.perf_counter() - started) / n


def store_cost(n_features: int = 10, repeat: int = 5) -> tuple[float, float]:
    """Milliseconds to append and to read back 1,000 samples in the on-device store."""
    from clients.store import DeviceStore

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, n_features)).astype(np.float32)
    y = rng.integers(0, 2, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        store = DeviceStore(Path(tmp) / "device.sqlite", capacity=5000)
        tick = iter(range(10**6))
        write = best_of(lambda: store.append(x, y, next(tick)), repeat)
        read = best_of(store.window, repeat)
        store.close()
    return 1e3 * write, 1e3 * read


def run() -> list[Figure]:
    """Memory of a device process against a bare ClientApp, detector costs, store I/O."""
    from clients.monitor import DETECTOR_NAMES

    fedge, bare = _memory("fedge"), _memory("bare")
    extra_mb = (fedge["hwm_kib"] - bare["hwm_kib"]) / 1024
    figures = [
        Figure(
            "4 device",
            "peak resident memory: fedge device vs bare Flower ClientApp",
            f"{fedge['hwm_kib'] / 1024:.0f} MB vs {bare['hwm_kib'] / 1024:.0f} MB",
            f"{extra_mb:+.1f} MB",
            "< +50 MB",
            extra_mb < 50,
        )
    ]
    for name in DETECTOR_NAMES:
        cost = detector_cost(name)
        goal = name in ("ADWIN", "PageHinkley")
        figures.append(
            Figure(
                "4 device",
                f"drift monitor {name}, per sample",
                f"{cost:.2f} µs",
                "",
                "< 20 µs" if goal else "",
                (cost < 20) if goal else None,
            )
        )
    write, read = store_cost()
    figures.append(
        Figure(
            "4 device",
            "on-device store, per 1,000 samples (10 features)",
            f"write {write:.2f} ms, read {read:.2f} ms",
        )
    )
    return figures


if __name__ == "__main__":
    _child(sys.argv[1])
