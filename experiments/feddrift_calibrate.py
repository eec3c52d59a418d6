"""Detector calibration for the FedDrift harness: the devices' setting per dataset, from measured streams.

For each dataset and seed, one model per concept is trained as the harness
trains it (FedAvg of 10 clients on one step of that concept, the harness
budget), and its 0/1 error stream, 100 samples per client-step, is fed through
the detector the devices run (:class:`clients.monitor.DriftMonitor`, one per
client and stream, fresh as after a model is served) for every setting of a grid:

- **stationary**: steps 1..10 of the model's own concept; a client-step on
  which the detector fired at least once is a false alarm (the harness reports
  one drift flag per device and tick);
- **drift**: for every ordered pair of distinct concepts ``(a, b)`` and change
  step ``k`` in :data:`CHANGE_STEPS`, steps ``1 .. k - 1`` of ``a`` then steps
  ``k`` and ``k + 1`` of ``b``; detected within one step when the detector
  fires at step ``k`` or ``k + 1`` (the harness's ``DETECTION_TOLERANCE``).

Per dataset the chosen setting has the highest detection within one step among
those with at most :data:`FALSE_ALARM_BOUND` false alarms per client-step
(tie: fewer false alarms, then the shorter delay); it is measured again on
held-out seeds (other models, other data). The result is
``experiments/feddrift_calibration.json`` (the choice and the whole grid), and
``calibration.csv`` in the results folder; the harness reads the choice
(:mod:`experiments.feddrift_detector`).

Run ``python -m experiments.feddrift_calibrate`` (``--help`` for the options)
or ``fedge feddrift --calibrate``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from experiments.feddrift import (
    DETECTION_TOLERANCE,
    N_CLIENTS,
    N_STEPS,
    SAMPLES,
    DatasetSpec,
    Settings,
    dataset_spec,
    model_for,
)
from experiments.feddrift_detector import CALIBRATION_FILE, FORMAT, data_key, load_calibration

#: Where the grid's CSV goes by default.
RESULTS = Path(__file__).parent / "results" / "feddrift"
#: The datasets of the harness that are calibrated by default.
CALIBRATED_DATASETS: tuple[str, ...] = (
    "sine2", "circle2", "sea4", "digits-swap", "river-sea4", "river-stagger", "river-agrawal",
)
#: Largest false-alarm rate per client-step a chosen setting may have.
FALSE_ALARM_BOUND = 0.05
#: Steps at which the concept changes in the drift streams (1 and 4 steps of pre-drift data).
CHANGE_STEPS: tuple[int, ...] = (2, 5)
SEEDS = 5
#: The harness's training budget (rounds, local epochs, learning rate, batch).
BUDGET = Settings()


@dataclass(frozen=True)
class Setting:
    """One detector setting of the grid.

    Parameters
    ----------
    detector : str
        A canonical name of :data:`clients.monitor.DETECTOR_NAMES`.
    params : tuple of (str, value)
        Constructor arguments, as pairs so the setting is hashable.
    """

    detector: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``ADWIN(delta=0.002)``."""
        return f"{self.detector}({', '.join(f'{k}={v}' for k, v in self.params)})"

    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments as a dict."""
        return dict(self.params)


ADWIN_DELTAS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)


def default_grid() -> list[Setting]:
    """ADWIN over ``delta`` (and a faster clock), PageHinkley (upward changes) and DDM over their thresholds.

    Left out for their cost on the error streams: KSWIN runs a
    Kolmogorov-Smirnov test on every sample (about 0.45 ms each here, a
    thousand times ADWIN), HDDM_A took 1.8 s per setting and seed on SINE-2
    (about 60 times ADWIN); either would take longer than the rest of the grid.
    """
    grid = [Setting("ADWIN", (("delta", d),)) for d in ADWIN_DELTAS]
    grid += [Setting("ADWIN", (("delta", d), ("clock", 8))) for d in (0.01, 0.1, 0.5, 1.0)]
    grid += [Setting("PageHinkley", (("threshold", t), ("mode", "up"))) for t in (5.0, 7.5, 10.0, 12.5, 15.0, 20.0)]
    grid += [Setting("DDM", (("drift_threshold", t),)) for t in (2.0, 2.5, 3.0)]
    return grid


# -- models and error streams -------------------------------------------------------------------


def _batch(gen: Any, concept: int, seed: int, client: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """One client-step of ``concept`` (its own random stream, apart from the harness's)."""
    rng = np.random.default_rng([seed, client, step, concept, 0xCA11B])
    x, y = gen.sample(concept, SAMPLES, rng)
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def train_fedavg(
    dataset: str, gen: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]], seed: int, s: Settings
) -> Any:
    """FedAvg of one step's batches (one per client) with the harness's budget; the trained model.

    Each client trains on the 90 % of its batch that the harness does not hold
    out (every tenth sample is the holdout), ``s.local_epochs`` epochs of Adam
    per round from the round's global model, as
    :func:`fedge.contracts.model.train` does; ``s.rounds`` rounds, equal
    weights (every client holds 90 samples). The clients train side by side
    as one stacked model: Adam works element by element and each client's loss
    reaches only its own slice, so this is the same arithmetic as training them
    one after the other, in one tenth of the calls.
    """
    import torch

    from fedge.contracts import model as nets

    model = nets.build_model(gen.n_features, gen.n_classes, **model_for(dataset))
    weights = nets.initial_weights(model, seed)
    keep = np.ones(SAMPLES, dtype=bool)
    keep[9::10] = False
    xs = torch.as_tensor(np.stack([x[keep] for x, _ in batches]))
    ys = torch.as_tensor(np.stack([y[keep] for _, y in batches]))
    n_clients, n = ys.shape
    names = list(weights)  # Linear layers in order: weight, bias, weight, bias, ...
    for rnd in range(s.rounds):
        params = [torch.tensor(np.repeat(weights[k][None], n_clients, axis=0), requires_grad=True) for k in names]
        opt = torch.optim.Adam(params, lr=s.lr)
        gens = [torch.Generator().manual_seed(seed * 1000 + rnd * N_CLIENTS + c) for c in range(n_clients)]
        for _ in range(s.local_epochs):
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
            for start in range(0, n, s.batch_size):
                idx = orders[:, start : start + s.batch_size]
                out = torch.gather(xs, 1, idx[..., None].expand(-1, -1, xs.shape[2]))
                for layer in range(0, len(params), 2):
                    out = torch.baddbmm(params[layer + 1][:, None, :], out, params[layer].transpose(1, 2))
                    if layer + 2 < len(params):
                        out = torch.relu(out)
                target = torch.gather(ys, 1, idx)
                loss = torch.nn.functional.cross_entropy(
                    out.reshape(-1, out.shape[2]), target.reshape(-1), reduction="none"
                ).reshape(n_clients, -1).mean(dim=1).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        weights = {k: p.detach().numpy().mean(axis=0) for k, p in zip(names, params)}
    nets.set_weights(model, weights)
    model.eval()
    return model


def error_streams(dataset: str, spec: DatasetSpec, seed: int, s: Settings) -> np.ndarray:
    """0/1 errors ``[model concept, data concept, client, step, sample]`` of one seed.

    The model of concept ``a`` trains on step 0 of ``a``; steps 1..10 of every
    concept are scored with it.
    """
    from fedge.contracts import model as nets
    from fedge.scenarios.generators import make_generator

    gen = make_generator(spec.generator, **spec.params)
    k = spec.n_concepts
    data = {(c, cl, t): _batch(gen, c, seed, cl, t) for c in range(k) for cl in range(N_CLIENTS) for t in range(N_STEPS)}
    errors = np.zeros((k, k, N_CLIENTS, N_STEPS, SAMPLES), dtype=bool)
    for a in range(k):
        model = train_fedavg(dataset, gen, [data[(a, cl, 0)] for cl in range(N_CLIENTS)], seed, s)
        for (c, cl, t), (x, y) in data.items():
            if t > 0:
                errors[a, c, cl, t] = nets.predict(model, x) != y
    return errors


# -- the detector on the streams ----------------------------------------------------------------


def _fires(setting: Setting, steps: Sequence[np.ndarray], seed: int) -> list[int | None]:
    """Per step, the position of the detector's first firing in it (None: silent)."""
    from clients.monitor import DriftMonitor

    monitor = DriftMonitor(setting.detector, setting.kwargs(), seed=seed)
    out = []
    for errors in steps:
        update = monitor.update(errors)
        out.append(update.first_drift_index)
    return out


def measure(setting: Setting, errors: np.ndarray, seed: int) -> dict[str, Any]:
    """False alarms on the stationary streams and detection on the drift streams of one seed.

    Returns
    -------
    dict
        Counts: ``client_steps``, ``false_alarms``, ``drifts``, ``detected``,
        ``delay_steps`` and ``delay_samples`` (sums over the detected drifts),
        and per ordered pair ``"a->b"`` its ``[drifts, detected]``.
    """
    k = errors.shape[0]
    out: dict[str, Any] = {"client_steps": 0, "false_alarms": 0, "drifts": 0, "detected": 0,
                           "delay_steps": 0, "delay_samples": 0, "pairs": {}}
    for a in range(k):
        for cl in range(N_CLIENTS):
            fires = _fires(setting, [errors[a, a, cl, t] for t in range(1, N_STEPS)], seed * 100 + cl)
            out["client_steps"] += len(fires)
            out["false_alarms"] += sum(f is not None for f in fires)
    for a, b in itertools.permutations(range(k), 2):
        pair = out["pairs"].setdefault(f"{a}->{b}", [0, 0])
        for change, cl in itertools.product(CHANGE_STEPS, range(N_CLIENTS)):
            steps = [errors[a, a, cl, t] for t in range(1, change)]
            steps += [errors[a, b, cl, t] for t in range(change, change + DETECTION_TOLERANCE)]
            after = _fires(setting, steps, seed * 100 + cl)[change - 1 :]
            out["drifts"] += 1
            pair[0] += 1
            hit = next(((d, f) for d, f in enumerate(after) if f is not None), None)
            if hit is not None:
                out["detected"] += 1
                pair[1] += 1
                out["delay_steps"] += hit[0]
                out["delay_samples"] += hit[0] * SAMPLES + hit[1] + 1
    return out


def summarise(setting: Setting, counts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One grid row: the counts of every seed pooled into rates."""
    total = {key: sum(c[key] for c in counts) for key in ("client_steps", "false_alarms", "drifts", "detected",
                                                          "delay_steps", "delay_samples")}
    pairs: dict[str, list[int]] = {}
    for c in counts:
        for name, (n, hit) in c["pairs"].items():
            got = pairs.setdefault(name, [0, 0])
            got[0] += n
            got[1] += hit
    detected = total["detected"]
    return {
        "detector": setting.detector,
        "params": setting.kwargs(),
        "setting": setting.label,
        "false_alarms_per_client_step": total["false_alarms"] / total["client_steps"],
        "detected_within_one_step": detected / total["drifts"] if total["drifts"] else float("nan"),
        "mean_delay_steps": total["delay_steps"] / detected if detected else None,
        "mean_delay_samples": total["delay_samples"] / detected if detected else None,
        "client_steps": total["client_steps"],
        "drifts": total["drifts"],
        "detection_per_pair": {name: hit / n for name, (n, hit) in pairs.items()},
    }


def choose(rows: Sequence[Mapping[str, Any]], bound: float = FALSE_ALARM_BOUND) -> dict[str, Any]:
    """The row with the best detection within one step among those within the false-alarm bound.

    Ties go to fewer false alarms, then to the shorter delay; when no setting
    meets the bound, the one with the fewest false alarms is returned with
    ``bound_met`` false.
    """
    within = [r for r in rows if r["false_alarms_per_client_step"] <= bound]
    if within:
        best = min(within, key=lambda r: (-r["detected_within_one_step"], r["false_alarms_per_client_step"],
                                          r["mean_delay_samples"] if r["mean_delay_samples"] is not None else math.inf))
    else:
        best = min(rows, key=lambda r: (r["false_alarms_per_client_step"], -r["detected_within_one_step"]))
    return {**best, "bound_met": bool(within)}


# -- the power of 100 samples per step ----------------------------------------------------------


def error_rates(streams: Sequence[np.ndarray]) -> dict[str, Any]:
    """Mean error of concept ``a``'s model on ``a`` and on every other concept, over seeds, clients, steps."""
    k = streams[0].shape[0]
    rate = np.mean([e[:, :, :, 1:].mean(axis=(2, 3, 4)) for e in streams], axis=0)
    return {
        "own": [round(float(rate[a, a]), 4) for a in range(k)],
        "gap": {f"{a}->{b}": round(float(rate[a, b] - rate[a, a]), 4) for a, b in itertools.permutations(range(k), 2)},
        "matrix": [[round(float(v), 4) for v in row] for row in rate],
    }


def ideal_power(p0: float, p1: float, n0: int, n1: int, alpha: float = FALSE_ALARM_BOUND) -> float:
    """Power of a one-sided two-proportion z-test at level ``alpha``: ``n0`` samples at ``p0`` vs ``n1`` at ``p1``.

    It knows where the change is, which no change detector does: a yardstick
    of what the samples of one client support at that false-alarm rate.
    """
    z = NormalDist().inv_cdf(1 - alpha)
    pooled = (n0 * p0 + n1 * p1) / (n0 + n1)
    null_se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n0 + 1 / n1))
    alt_se = math.sqrt(max(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1, 1e-12))
    return NormalDist().cdf(((p1 - p0) - z * null_se) / alt_se)


def power_analysis(rates: Mapping[str, Any], alpha: float = FALSE_ALARM_BOUND) -> dict[str, Any]:
    """The detection an ideal test reaches on the measured error rates, per change step and pair.

    For a change at step ``k`` the test compares the ``100 (k - 1)`` pre-drift
    samples with the 100 of step ``k`` (fires at the change step) or the 200
    of steps ``k`` and ``k + 1`` (fires at the next); a test that looks at both
    steps, each at the false-alarm level, detects within one step with a
    probability between the larger of the two and their sum.
    """
    matrix = rates["matrix"]
    k = len(matrix)
    per: dict[str, Any] = {}
    low, high = [], []
    for change in CHANGE_STEPS:
        n0 = SAMPLES * (change - 1)
        for a, b in itertools.permutations(range(k), 2):
            p0, p1 = matrix[a][a], matrix[a][b]
            at = ideal_power(p0, p1, n0, SAMPLES, alpha)
            nxt = ideal_power(p0, p1, n0, 2 * SAMPLES, alpha)
            per[f"k={change} {a}->{b}"] = [round(at, 3), round(nxt, 3)]
            low.append(max(at, nxt))
            high.append(min(1.0, at + nxt))
    own = float(np.mean([matrix[a][a] for a in range(k)]))
    return {
        "alpha": alpha,
        "standard_error_100": round(math.sqrt(own * (1 - own) / SAMPLES), 4),
        "ideal_within_one_step": [round(float(np.mean(low)), 3), round(float(np.mean(high)), 3)],
        "per_change_and_pair": per,
    }


# -- the whole calibration ----------------------------------------------------------------------


def calibrate_dataset(
    dataset: str,
    seeds: Sequence[int],
    grid: Sequence[Setting],
    s: Settings = BUDGET,
    validation_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """Calibrate one dataset: its chosen setting, the whole grid and the error rates.

    With ``validation_seeds`` the chosen setting is measured again on streams
    of those seeds (models and data the choice never saw): the choice sits at
    the edge of the bound by construction, so its in-sample false-alarm rate
    flatters it.
    """
    import torch

    torch.set_num_threads(1)
    spec = dataset_spec(dataset)
    started = time.perf_counter()
    streams = [error_streams(dataset, spec, seed, s) for seed in seeds]
    trained = time.perf_counter() - started
    rows = [summarise(setting, [measure(setting, e, seed) for e, seed in zip(streams, seeds)]) for setting in grid]
    rates = error_rates(streams)
    chosen = choose(rows)
    entry = {
        "data": data_key(spec.generator, spec.params),
        "seeds": list(seeds),
        "n_concepts": spec.n_concepts,
        "chosen": chosen,
        "error_rates": rates,
        "ideal_test": power_analysis(rates),
        "grid": rows,
    }
    if validation_seeds:
        setting = Setting(chosen["detector"], tuple(chosen["params"].items()))
        held = [(error_streams(dataset, spec, seed, s), seed) for seed in validation_seeds]
        entry["validation"] = {"seeds": list(validation_seeds),
                               **summarise(setting, [measure(setting, e, seed) for e, seed in held])}
    entry["seconds"] = {"streams": round(trained, 1), "total": round(time.perf_counter() - started, 1)}
    return entry


def calibrate(
    datasets: Sequence[str] = CALIBRATED_DATASETS,
    seeds: Sequence[int] = tuple(range(SEEDS)),
    grid: Sequence[Setting] | None = None,
    s: Settings = BUDGET,
    *,
    validation_seeds: Sequence[int] = (),
    progress: Any = None,
) -> dict[str, Any]:
    """Calibrate every dataset; the document :data:`CALIBRATION_FILE` holds."""
    grid = list(grid) if grid is not None else default_grid()
    started = time.perf_counter()
    out: dict[str, Any] = {}
    for name in datasets:
        out[name] = calibrate_dataset(name, seeds, grid, s, validation_seeds)
        if progress is not None:
            progress(name, out[name])
    return {
        "format": FORMAT,
        "version": 1,
        "seeds": list(seeds),
        "validation_seeds": list(validation_seeds),
        "protocol": {
            "clients": N_CLIENTS, "samples_per_step": SAMPLES, "stationary_steps": N_STEPS - 1,
            "change_steps": list(CHANGE_STEPS), "tolerance_steps": DETECTION_TOLERANCE,
            "false_alarm_bound": FALSE_ALARM_BOUND,
            "training": {"kind": "fedavg", "rounds": s.rounds, "local_epochs": s.local_epochs, "lr": s.lr,
                         "batch_size": s.batch_size, "holdout_every": 10},
        },
        "seconds": round(time.perf_counter() - started, 1),
        "datasets": out,
    }


CSV_COLUMNS = ("dataset", "setting", "detector", "params", "false_alarms_per_client_step",
               "detected_within_one_step", "mean_delay_steps", "mean_delay_samples", "client_steps", "drifts",
               "chosen")


def write_outputs(result: Mapping[str, Any], json_path: Path, csv_path: Path) -> dict[str, Any]:
    """The calibration as JSON and the grid as CSV; returns the document written.

    An existing calibration in ``json_path`` keeps its other datasets (each
    entry names its own seeds), so calibrating one dataset again replaces
    only that dataset's entry. The CSV holds this run's datasets.
    """
    kept = load_calibration(json_path).get("datasets", {})
    doc = {**result, "datasets": {**{k: v for k, v in kept.items() if k not in result["datasets"]},
                                  **result["datasets"]}}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for name, entry in result["datasets"].items():
            for row in entry["grid"]:
                values = {**row, "dataset": name, "params": json.dumps(row["params"], sort_keys=True),
                          "chosen": row["setting"] == entry["chosen"]["setting"]}
                writer.writerow([_cell(values[c]) for c in CSV_COLUMNS])
    return doc


def _cell(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else ("" if value is None else value)


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """One line per dataset: the chosen setting and its figures."""
    lines = []
    for name, entry in result["datasets"].items():
        c = entry["chosen"]
        delay = "-" if c["mean_delay_steps"] is None else f"{c['mean_delay_steps']:.2f} steps"
        lines.append(
            f"{name}: {c['setting']}  false alarms {c['false_alarms_per_client_step']:.3f}/client-step  "
            f"detected within one step {100 * c['detected_within_one_step']:.0f}%  delay {delay}"
            + ("" if c["bound_met"] else "  (no setting within the false-alarm bound)")
            + (f"; held-out seeds: false alarms {v['false_alarms_per_client_step']:.3f}, detected "
               f"{100 * v['detected_within_one_step']:.0f}%" if (v := entry.get("validation")) else "")
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the calibration and write the JSON and the CSV."""
    parser = argparse.ArgumentParser(prog="python -m experiments.feddrift_calibrate",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--datasets", default=",".join(CALIBRATED_DATASETS), help="comma-separated datasets")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds 0 .. N-1 (default {SEEDS})")
    parser.add_argument("--validation-seeds", type=int, default=SEEDS,
                        help=f"held-out seeds N .. N+M-1 that re-measure the chosen setting (default {SEEDS}; 0: none)")
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE, help="the JSON (default: the committed one)")
    parser.add_argument("--csv", type=Path, default=RESULTS / "calibration.csv", help="the grid as CSV")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.validation_seeds < 0:
        parser.error("--seeds must be at least 1 and --validation-seeds at least 0")
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    try:
        for name in names:
            dataset_spec(name)
    except ValueError as exc:
        parser.error(str(exc))
    result = run(names, args.seeds, args.out, args.csv, print, args.validation_seeds)
    print(f"{result['seconds']:.0f} s; wrote {args.out} and {args.csv}")
    return 0


def run(
    datasets: Sequence[str], seeds: int, json_path: Path, csv_path: Path, say: Any, validation: int = SEEDS
) -> dict[str, Any]:
    """Calibrate on seeds ``0 .. seeds - 1``, re-measure on the next ``validation``; write both files."""

    def progress(name: str, entry: Mapping[str, Any]) -> None:
        say(summary_lines({"datasets": {name: entry}})[0] + f"  ({entry['seconds']['total']:.0f} s)")

    result = calibrate(datasets, tuple(range(seeds)), validation_seeds=tuple(range(seeds, seeds + validation)),
                       progress=progress)
    write_outputs(result, json_path, csv_path)
    return result


def run_from_cli(datasets: str, results: Path, say: Any) -> None:
    """``fedge feddrift --calibrate``: the default seeds, the committed JSON, the CSV in ``results``.

    Raises
    ------
    ValueError
        On an unknown dataset (one line), before anything runs.
    """
    names = [d.strip() for d in datasets.split(",") if d.strip()]
    for name in names:
        dataset_spec(name)
    csv_path = results.expanduser().resolve() / "calibration.csv"
    result = run(names, SEEDS, CALIBRATION_FILE, csv_path, say)
    say(f"{result['seconds']:.0f} s; wrote {CALIBRATION_FILE} and {csv_path}")


if __name__ == "__main__":
    sys.exit(main())
