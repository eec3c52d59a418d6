"""Item 8: what the label-free detectors cost on a device, beside the label-based ADWIN.

Every detector sees the same ticks of 100 rows: the label-based monitor their 0/1
errors, the input tests their features against a reference of 200 rows, the
prediction monitor the model's class probabilities. Costs are per sample (the
tick's time divided by its rows) and per tick, measured in one run so the ratios
against ADWIN compare like with like.
"""

from __future__ import annotations

import time

import numpy as np

from experiments.benchmarks.common import Figure

TICK_ROWS = 100


def _per_tick(feed: object, ticks: list[tuple[np.ndarray, ...]]) -> float:
    """Mean seconds per tick of ``feed(*tick)`` (after one warm-up tick)."""
    feed(*ticks[0])  # type: ignore[operator]
    started = time.perf_counter()
    for tick in ticks[1:]:
        feed(*tick)  # type: ignore[operator]
    return (time.perf_counter() - started) / (len(ticks) - 1)


def costs(n_ticks: int = 60, width: int = 10, wide: int = 64) -> dict[str, float]:
    """Seconds per tick of each detector configuration."""
    from clients.label_free import LabelFreeMonitor
    from clients.monitor import DriftMonitor

    rng = np.random.default_rng(0)
    errors = [(rng.random(TICK_ROWS) < 0.1,) for _ in range(n_ticks)]
    probs = rng.dirichlet([4, 1], size=(n_ticks, TICK_ROWS))
    narrow = [(rng.normal(size=(TICK_ROWS, width)).astype(np.float32),) for _ in range(n_ticks)]
    broad = [(rng.normal(size=(TICK_ROWS, wide)).astype(np.float32),) for _ in range(n_ticks)]
    out = {"label ADWIN": _per_tick(DriftMonitor("ADWIN", seed=0).update, errors)}

    def monitor(test: str, prediction: str, reference: np.ndarray) -> LabelFreeMonitor:
        m = LabelFreeMonitor(input_test=test, prediction=prediction, seed=0)
        m.install(reference)
        return m

    conf = monitor("none", "confidence", np.zeros((0, width), np.float32))
    out["prediction ADWIN on confidence + estimate"] = _per_tick(
        lambda p: conf.observe(np.zeros((TICK_ROWS, 1), np.float32), p), [(p,) for p in probs]
    )
    ref = rng.normal(size=(200, width)).astype(np.float32)
    out[f"input KS, {width} features"] = _per_tick(monitor("ks", "none", ref).observe, narrow)
    wide_ref = rng.normal(size=(200, wide)).astype(np.float32)
    out[f"input KS, {wide} features"] = _per_tick(monitor("ks", "none", wide_ref).observe, broad)
    out[f"input MMD, {wide} features, 200 permutations"] = _per_tick(
        monitor("mmd", "none", wide_ref).observe, broad[: max(6, n_ticks // 4)]
    )
    return out


def run(n_ticks: int = 60) -> list[Figure]:
    """One figure per detector: per sample and per tick, and the ratio to label-based ADWIN."""
    measured = costs(n_ticks)
    base = measured["label ADWIN"]
    figures = []
    for name, seconds in measured.items():
        per_sample = 1e6 * seconds / TICK_ROWS
        goal = name.startswith(("label", "prediction"))
        figures.append(
            Figure(
                "8 label-free",
                f"{name}, per sample / per tick of {TICK_ROWS}",
                f"{per_sample:.2f} µs / {1e3 * seconds:.3f} ms",
                "1.0x (the budget)" if name == "label ADWIN" else f"{seconds / base:.1f}x ADWIN",
                "< 20 µs per sample" if goal else "",
                (per_sample < 20) if goal else None,
            )
        )
    return figures


if __name__ == "__main__":
    for figure in run():
        print(f"{figure.name}: {figure.value} ({figure.ratio})")
