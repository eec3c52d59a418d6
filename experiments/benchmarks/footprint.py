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
from typing import Any

import numpy as np

from experiments.benchmarks.common import Figure, best_of


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(kind: str, setup_file: str) -> None:
    """One device process: build the node's ClientApp, serve a poll (fedge) and a training round.

    It imports only what such a process needs: Flower, torch, NumPy and the app
    (fedge's ClientApp, or the bare one); the data were put in place by the parent.
    """
    started = float(sys.argv[4]) if len(sys.argv) > 4 else time.time()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from fedge.engines.inprocess import InProcessGrid

    setup = json.loads(Path(setup_file).read_text())
    if kind == "fedge":
        from clients.client_app import app

        grid = InProcessGrid(app, 1, setup["run_config"])
        query = RecordDict({"config": ConfigRecord({"tick": 0, "champion-version": 0})})
        grid.send_and_receive([Message(query, 1000, "query", group_id="tick-0")])
    else:
        from experiments.benchmarks import bare_app

        bare_app.configure(Path(setup["bare_data"]), setup["hidden"], setup["layers"], setup["holdout"])
        grid = InProcessGrid(bare_app.app, 1, {})
    with np.load(setup["weights"], allow_pickle=False) as f:
        arrays = ArrayRecord({k: Array(f[k]) for k in f.files})
    train = RecordDict(
        {
            "arrays": arrays,
            "config": ConfigRecord(
                {
                    "local-epochs": setup["local_epochs"],
                    "lr": setup["lr"],
                    "batch-size": setup["batch_size"],
                    "seed": 0,
                    "tick": 0,
                    "server-round": 1,
                }
            ),
        }
    )
    replies = list(grid.send_and_receive([Message(train, 1000, "train", group_id="r1")]))
    assert replies and not replies[0].has_error(), replies
    elapsed = time.time() - started
    loaded = sorted({m.split(".")[0] for m in sys.modules})
    print(
        json.dumps(
            {
                "rss_kib": _status_kib("VmRSS"),
                "hwm_kib": _status_kib("VmHWM"),
                "seconds": elapsed,
                "heavy": [m for m in ("sklearn", "scipy", "pandas", "mlflow") if m in loaded],
            }
        )
    )


def _prepare(tmp: Path) -> Path:
    """The inbox of a fedge device, the same rows for the bare app, and the starting weights."""
    from experiments.benchmarks.common import small_config, write_bare_data
    from fedge.contracts import model as nets
    from fedge.runner import RunRequest, feed_devices
    from fedge.scenarios import build_scenario

    cfg, overrides = small_config(tmp, "scenario.clients=1")
    folder = tmp / "run"
    feed_devices(cfg, folder)
    scenario = build_scenario(cfg.scenario)
    model = nets.build_model(scenario.n_features, scenario.n_classes, cfg.model.hidden, cfg.model.layers)
    weights = nets.initial_weights(model, 0)
    np.savez(tmp / "weights.npz", **weights)
    c = cfg.campaign
    setup = {
        "run_config": RunRequest(None, overrides, "inprocess").run_config(cfg, folder, "inprocess"),
        "bare_data": str(write_bare_data(cfg, tmp / "bare-data")),
        "weights": str(tmp / "weights.npz"),
        "hidden": cfg.model.hidden,
        "layers": cfg.model.layers,
        "holdout": c.holdout_every,
        "local_epochs": c.local_epochs,
        "lr": c.lr,
        "batch_size": c.batch_size,
    }
    path = tmp / "setup.json"
    path.write_text(json.dumps(setup))
    return path


def _process(kind: str, setup: Path) -> dict[str, Any]:
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmarks.footprint", kind, str(setup), "", repr(started)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    result = dict(json.loads(out.strip().splitlines()[-1]))
    result["wall"] = time.time() - started
    return result


def device_processes(repeat: int = 3) -> dict[str, dict[str, float]]:
    """Peak memory and cold start (spawn to first training reply) of both kinds, alternated."""
    runs: dict[str, list[dict[str, Any]]] = {"fedge": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        setup = _prepare(Path(tmp))
        for _ in range(repeat):
            for kind in ("bare", "fedge"):
                runs[kind].append(_process(kind, setup))
    return {
        kind: {
            "hwm_mb": float(np.median([r["hwm_kib"] for r in rs])) / 1024,
            "seconds": float(np.median([r["wall"] for r in rs])),
            "seconds_min": float(min(r["wall"] for r in rs)),
            "seconds_max": float(max(r["wall"] for r in rs)),
            "heavy": sorted({m for r in rs for m in r["heavy"]}),
        }
        for kind, rs in runs.items()
    }


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
    """Memory and cold start of a device process against a bare ClientApp, detector costs, store I/O."""
    from clients.monitor import DETECTOR_NAMES

    procs = device_processes()
    fedge, bare = procs["fedge"], procs["bare"]
    extra_mb = fedge["hwm_mb"] - bare["hwm_mb"]
    ratio = fedge["seconds"] / bare["seconds"]
    figures = [
        Figure(
            "4 device",
            "peak resident memory: fedge device vs bare Flower ClientApp (torch, same model)",
            f"{fedge['hwm_mb']:.0f} MB vs {bare['hwm_mb']:.0f} MB",
            f"{extra_mb:+.1f} MB",
            "<= +30 MB",
            extra_mb <= 30,
        ),
        Figure(
            "4 device",
            "cold start to first training reply (median of 3, alternated)",
            f"{fedge['seconds']:.2f} s ({fedge['seconds_min']:.2f}-{fedge['seconds_max']:.2f}) vs "
            f"{bare['seconds']:.2f} s ({bare['seconds_min']:.2f}-{bare['seconds_max']:.2f})",
            f"{ratio:.2f}x",
            "<= 1.3x",
            ratio <= 1.3,
        ),
        Figure(
            "4 device",
            "heavy libraries a fedge device process loads (scikit-learn, SciPy, pandas, MLflow)",
            ", ".join(fedge["heavy"]) or "none",
            "",
            "none",
            not fedge["heavy"],
        ),
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
    _child(sys.argv[1], sys.argv[2])
