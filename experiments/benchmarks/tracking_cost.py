"""Item 6: what MLflow costs per registered version and per logged tick, on a SQLite store."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric

from experiments.benchmarks.common import Figure
from fedge.contracts import model as nets
from fedge.tracking import Tracker, default_tracking_uri

TICK_METRICS = ("drift_fraction", "rejected_rows", "devices_reporting", "champion_version", "acc")


def run(versions: int = 3, ticks: int = 50) -> list[Figure]:
    """Seconds to open a fresh store, to register a version, and per tick of metrics."""
    with tempfile.TemporaryDirectory(prefix="fedge-bench-mlflow-") as tmp:
        uri = default_tracking_uri(Path(tmp))
        started = time.perf_counter()
        tracker = Tracker(uri, "bench", "bench-model")
        fresh = time.perf_counter() - started
        started = time.perf_counter()
        Tracker(uri, "bench", "bench-model")
        reopen = time.perf_counter() - started
        tracker.start({"bench": 1})
        model = nets.build_model(2, 2)
        example = np.zeros((5, 2), np.float32)
        started = time.perf_counter()
        for i in range(versions):
            tracker.register_model(model, example, {"i": str(i)})
        per_version = (time.perf_counter() - started) / versions

        values = {name: 0.5 for name in TICK_METRICS}
        started = time.perf_counter()
        for tick in range(ticks):
            tracker.log_metrics(values, step=tick)
        in_round = (time.perf_counter() - started) / ticks
        started = time.perf_counter()
        tracker.flush()
        flush = time.perf_counter() - started

        run_id = tracker.run_id
        assert run_id is not None
        client = tracker._client  # the same store, written the blocking way
        started = time.perf_counter()
        for tick in range(ticks):
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                metrics=[Metric(f"sync/{k}", v, now, tick) for k, v in values.items()],
                synchronous=True,
            )
        blocking = (time.perf_counter() - started) / ticks
        tracker.end()
        logged = len(client.get_metric_history(run_id, "acc"))
    return [
        Figure(
            "6 MLflow",
            "seconds per registered model version",
            f"{per_version:.2f} s",
            "",
            "off the rounds (after a campaign)",
            None,
        ),
        Figure(
            "6 MLflow",
            f"per logged tick ({len(TICK_METRICS)} metrics), time on the caller's path",
            f"{1e3 * in_round:.2f} ms queued vs {1e3 * blocking:.2f} ms blocking",
            f"{blocking / in_round:.0f}x less time in the loop",
            "never blocks a round; nothing lost",
            logged == ticks,
            {"flush_s": flush},
        ),
        Figure(
            "6 MLflow",
            "opening the store: fresh SQLite file vs existing",
            f"{fresh:.2f} s vs {reopen:.2f} s",
        ),
    ]
