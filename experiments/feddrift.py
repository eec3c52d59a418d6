"""The FedDrift benchmark: the paper's protocol, every retraining policy, one table.

Protocol (Jothimurugesan et al., AISTATS 2023): 10 clients, time steps 0..10,
100 samples per client per step; the models train on step ``t`` and are tested
on step ``t + 1``; the score is the sample-weighted accuracy over all clients,
averaged over steps 1..10. In fedge's loop that is the prequential accuracy of
tick ``t + 1`` (each device tests its new samples with the model deployed after
tick ``t``'s campaign, which trained on tick ``t``'s window of 100 samples).

Every policy runs through the same ServerApp and ClientApp code on the
in-process engine, on the same seeds:

==================  ==========================================================
``never``           train once at step 0
``window``          one model retrained every step on the latest step (FedAvg)
``oracle``          one model per true concept, clients assigned from the matrix
``drift-triggered`` one model, retrained only when on-device detection fires
``drift-clustered`` several models: split on detection, recognise, merge
==================  ==========================================================

The oracle knows the concept each client's training data came from (step
``t``) and serves the client that concept's model at ``t + 1``; like every
other policy it does not see the future, so a drift at ``t + 1`` costs it too.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments.feddrift_detector import detector_setting
from fedge.contracts.config import PROJECT_ROOT
from fedge.contracts.config_load import load_config
from fedge.contracts.protocol import DriftReport
from fedge.core.pool import ClusterPlan, ClusterView
from fedge.core.ports import Scores
from fedge.runner import feed_devices
from fedge.scenarios import ConceptSchedule

log = logging.getLogger("fedge.feddrift")

#: Where the FedDrift reference data lives when it is present (never copied into the project).
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "feddrift"

POLICIES: tuple[str, ...] = ("never", "window", "oracle", "drift-triggered", "drift-clustered")
DATASETS: tuple[str, ...] = ("sine2", "circle2", "sea4", "digits-swap")
DEFAULT_MATRIX: dict[str, str] = {"sine2": "A", "circle2": "A", "sea4": "B", "digits-swap": "A"}
N_CLIENTS = 10
N_STEPS = 11
SAMPLES = 100
#: Ticks after a true drift within which a detection counts for it.
DETECTION_TOLERANCE = 2


@dataclass(frozen=True)
class Settings:
    """Training budget of the benchmark (the same for every policy).

    Parameters
    ----------
    rounds : int, default 5
        Flower rounds per campaign (the paper uses 200 with a 4-unit net; our
        wider net converges in a few).
    local_epochs : int, default 5
        Local epochs per round (as in the paper).
    lr : float, default 0.01
        Adam learning rate (the paper's rate).
    batch_size : int, default 16
        Local batch size.
    detector : str, optional
        The devices' river detector; given, it overrides the calibration
        (:func:`experiments.feddrift_detector.detector_setting`). By default
        each dataset runs its setting in ``experiments/feddrift_calibration.json``,
        or ADWIN with delta 0.002 when it is not calibrated.
    delta : float, optional
        ADWIN's confidence parameter (larger fires sooner and more often);
        given, it overrides the calibration (with ADWIN unless ``detector``
        names another detector).
    quorum : float, default 0.3
        ``drift-triggered``: fraction of devices whose detectors must fire.
    cooldown : int, default 3
        ``drift-triggered``: ticks after a campaign during which no new one starts.
    memory : int, default 4
        ``drift-triggered``: a device whose detector fired in the last ``memory``
        ticks (after the last campaign) counts toward the quorum; devices of a
        staggered schedule drift, and fire, at different steps.
    gate_z : float, default 1.645
        ``drift-triggered``: a candidate is promoted only when it beats the
        champion on the holdout by this many standard errors of the paired
        difference (one-sided 5 %); a lead of a point or two on 100 held-out
        samples is noise.
        The replaced champion stays on standby and serves again when it leads
        the new one by as many standard errors (``campaign.standby_z``).
    """

    rounds: int = 5
    local_epochs: int = 5
    lr: float = 0.01
    batch_size: int = 16
    detector: str | None = None
    delta: float | None = None
    quorum: float = 0.3
    cooldown: int = 3
    memory: int = 4
    gate_z: float = 1.645


#: Named datasets beyond the generators' own names: river's streams with the settings the sweep uses.
DATASET_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "river-sea4": ("river-sea", {"concepts": "0,1,2,3"}),
    "river-stagger": ("river-stagger", {"concepts": "0,1,2"}),
    "river-agrawal": ("river-agrawal", {"concepts": "0,2"}),
    "river-hyperplane": ("river-hyperplane", {"concepts": "1,2"}),
}


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the benchmark: a registered generator and its parameters.

    Parameters
    ----------
    name : str
        As given (``sine2``, ``river-agrawal``, ``river-agrawal:concepts=0/1/2``).
    generator : str
        The generator's registered name (:data:`fedge.scenarios.generators.GENERATOR_NAMES`).
    params : dict
        Its parameters.
    n_concepts : int
        Concepts it has.
    """

    name: str
    generator: str
    params: dict[str, Any]
    n_concepts: int


def dataset_spec(name: str) -> DatasetSpec:
    """Parse ``GENERATOR[:key=value;key=value]`` (a list value as ``0/2``) or a named dataset.

    Raises
    ------
    ValueError
        On an unknown generator, parameter or value (one line).
    """
    from fedge.scenarios.generators import make_generator

    base, _, rest = name.partition(":")
    generator, params = DATASET_ALIASES.get(base, (base, {}))
    params = dict(params)
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"feddrift: dataset {name!r}: expected key=value, got {item!r}")
        params[key.strip()] = value.strip().replace("/", ",")
    if generator == "sea4" and not params and sea_source() is not None:
        params = {"source": sea_source()}
    try:
        n_concepts = make_generator(generator, **params).n_concepts
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"feddrift: dataset {name!r}: {exc}") from None
    return DatasetSpec(name, generator, params, n_concepts)


def model_for(dataset: str) -> dict[str, int]:
    """The classifier of a dataset: one hidden layer, wider for the digits."""
    return {"hidden": 64, "layers": 1} if dataset == "digits-swap" else {"hidden": 16, "layers": 2}


# -- concept matrices -------------------------------------------------------------------------


def generated_matrix(name: str, n_concepts: int, seed: int = 11) -> np.ndarray:
    """A staggered concept matrix of our own, used when the FedDrift files are absent.

    Every client starts on concept 0; from step 1 on, each client drifts at two or
    three random steps to another concept (back and forth for two concepts).
    """
    rng = np.random.default_rng([seed, sum(map(ord, name)), n_concepts])
    matrix = np.zeros((N_STEPS, N_CLIENTS), dtype=np.int64)
    for client in range(N_CLIENTS):
        steps = sorted(rng.choice(np.arange(1, N_STEPS - 2), size=int(rng.integers(1, 4)), replace=False))
        concept = 0
        for step in steps:
            choices = [c for c in range(n_concepts) if c != concept]
            concept = int(rng.choice(choices))
            matrix[step:, client] = concept
    return matrix


#: The concept matrices of the FedDrift repository (``changepoints/<name>.cp``).
PAPER_MATRICES: tuple[str, ...] = (
    "A", "B", "C", "D", "E", "F", "W", "X", "Y", "Z", *(f"R{i}" for i in range(10)),
)


def _write_matrix(path: Path, matrix: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(str(int(v)) for v in row) for row in matrix) + "\n")
    return path


def matrix_file(name: str, n_concepts: int, folder: Path) -> tuple[Path, str]:
    """The ``.cp`` file that matrix spec ``name`` stands for.

    Parameters
    ----------
    name : str
        A paper matrix (:data:`PAPER_MATRICES`, read from the shared FedDrift
        data), a path to a ``.cp`` file, or ``random-<seed>`` for a staggered
        matrix of our own (:func:`generated_matrix`).
    n_concepts : int
        Concepts the dataset has. A matrix whose ids are not ``0 .. n - 1``
        (FedDrift's Z uses 0 and 2) is relabelled densely in order of first use.
    folder : Path
        Where a generated or relabelled matrix is written (the results folder).

    Returns
    -------
    tuple
        The file and where it came from (``"feddrift"``, ``"file"``, ``"generated"``).

    Raises
    ------
    ValueError
        On an unknown name, a missing file, a paper matrix without the shared
        data, or a matrix with more concepts than the dataset.
    """
    if name.endswith(".cp") or "/" in name or "\\" in name:
        path, origin = Path(name).expanduser(), "file"
        if not path.is_file():
            raise ValueError(f"feddrift: matrix file {name!r} not found")
    elif name in PAPER_MATRICES:
        path, origin = SHARED_DATA / "changepoints" / f"{name}.cp", "feddrift"
        if not path.is_file():
            raise ValueError(
                f"feddrift: matrix {name!r} needs the FedDrift data in {SHARED_DATA}; "
                "pass a .cp file or random-<seed> instead"
            )
    elif name.startswith("random-") and name[len("random-") :].isdigit():
        seed = int(name[len("random-") :])
        path = _write_matrix(folder / f"{name}-{n_concepts}c.cp", generated_matrix(name, n_concepts, seed))
        return path, "generated"
    else:
        raise ValueError(
            f"feddrift: unknown matrix {name!r}; allowed: {', '.join(PAPER_MATRICES)}, "
            "a path to a .cp file, or random-<seed>"
        )
    try:
        matrix = np.asarray(ConceptSchedule.from_cp_file(path).matrix)
    except (OSError, ValueError) as exc:
        raise ValueError(f"feddrift: matrix {name!r}: {exc}") from None
    ids = list(dict.fromkeys(int(v) for v in matrix.reshape(-1)))
    if len(ids) > n_concepts:
        raise ValueError(f"feddrift: matrix {name!r} uses {len(ids)} concepts; the dataset has {n_concepts}")
    if max(ids) >= n_concepts:
        dense = np.vectorize({old: new for new, old in enumerate(ids)}.get)(matrix)
        stem = path.stem if origin == "feddrift" else f"{path.stem}-file"
        return _write_matrix(folder / f"{stem}-relabelled.cp", dense), origin
    return path, origin


def sea_source() -> str | None:
    """The FedDrift SEA csv folder when present."""
    folder = SHARED_DATA / "sea"
    return str(folder) if (folder / "concept1.csv").is_file() else None


# -- the oracle --------------------------------------------------------------------------------


@dataclass
class OracleAssignment:
    """One model per true concept; each client trains and is served by its concept's model.

    Parameters
    ----------
    schedule : ConceptSchedule
        The true concept of every client at every step.
    """

    schedule: ConceptSchedule

    @property
    def needs_scores(self) -> bool:
        """The oracle reads the matrix, not the data."""
        return False

    def plan(
        self,
        tick: int,
        reports: Sequence[DriftReport],
        clusters: Mapping[int, ClusterView],
        scores: Scores | None,
    ) -> ClusterPlan:
        """Clients of concept ``k`` at ``tick`` form cluster ``k``."""
        assignment = {r.device: self.schedule.concept(tick, r.device) for r in reports}
        new: dict[int, int | None] = {k: None for k in set(assignment.values()) if k not in clusters}
        return ClusterPlan(assignment, start_from=new)


# -- one run -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def to_toml(data: Mapping[str, Any]) -> str:
    """Nested tables of scalars as TOML text."""
    lines: list[str] = []

    def table(prefix: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in values.items():
            if isinstance(v, Mapping):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines)


@dataclass(frozen=True)
class Task:
    """One (dataset, matrix, seed): every policy on it."""

    dataset: str
    matrix: str
    seed: int
    policies: tuple[str, ...]
    folder: Path
    settings: Settings
    cp_file: Path | None = None


def _slug(text: str) -> str:
    """A name part safe in run and model names (a matrix may be a path)."""
    stem = Path(text).stem if text.endswith(".cp") else text
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)


def scenario_table(task: Task, policy: str, cp_file: Path) -> dict[str, Any]:
    """The scenario file of one policy run."""
    s = task.settings
    schedule = ConceptSchedule.from_cp_file(cp_file)
    name = f"feddrift-{_slug(task.dataset)}-{_slug(task.matrix)}-{policy}-s{task.seed}"
    spec = dataset_spec(task.dataset)
    detector, params, _ = detector_setting(task.dataset, spec.generator, spec.params, s.detector, s.delta)
    trigger: dict[str, Any] = {"policy": "never"}
    campaign: dict[str, Any] = {
        "strategy": "fedavg",
        "rounds": s.rounds,
        "initial_rounds": s.rounds,
        "local_epochs": s.local_epochs,
        "lr": s.lr,
        "batch_size": s.batch_size,
        "holdout_every": 10,
        "warm_start": True,
        "participants": "all",
        # The baselines keep the model each step trained (no standby).
        "standby_z": 0.0,
    }
    if policy in ("window", "oracle", "drift-clustered"):
        # Every model in service retrains each step on its devices' newest window
        # (FedDrift's protocol); the gate promotes every candidate.
        trigger = {"policy": "always"}
        campaign["min_improvement"] = -1.0
    elif policy == "drift-triggered":
        # A triggered retraining keeps the gate: a candidate that does worse on
        # the devices' held-out samples than the champion is registered, never
        # promoted. (With the gate open, one model retrained on a mix of concepts
        # followed the majority and scored below never training again.)
        trigger = {"policy": "quorum", "quorum": s.quorum, "cooldown": s.cooldown, "memory": s.memory}
        campaign["min_improvement"] = 0.0
        campaign["gate_z"] = s.gate_z
        # The champion a promotion replaces stays on standby and serves again
        # when it leads on the devices' newest samples by the same margin: the
        # gate judges one tick, and the mix of concepts moves after it.
        campaign["standby_z"] = s.gate_z
    return {
        "scenario": {
            "name": name,
            "generator": spec.generator,
            "seed": task.seed,
            "clients": schedule.n_clients,
            "ticks": schedule.n_steps,
            "samples_per_tick": SAMPLES,
            "bad_row_fraction": 0.0,
            "schedule": {"kind": "matrix", "file": str(cp_file)},
            "generator_params": spec.params,
        },
        "monitor": {
            "detector": detector,
            "params": params,
            "window": SAMPLES,
            "reset_window_on_drift": False,
        },
        "trigger": trigger,
        "campaign": campaign,
        # Up to 8 models (the most the devices score): a tick where most devices
        # drift at once needs room for one new model per device.
        "clustering": {"enabled": True, "max_models": 8} if policy == "drift-clustered" else {"enabled": False},
        "model": model_for(task.dataset),
        "tracking": {"experiment": "fedge-feddrift"},
        "run": {"output_dir": str(task.folder), "resume": False},
    }


def run_policy(task: Task, policy: str, cp_file: Path) -> dict[str, Any]:
    """Run one policy through the ServerApp and ClientApp on the in-process engine."""
    from clients.client_app import app as client_app
    from clients.client_app import forget_devices
    from fedge.engines.inprocess import InProcessGrid
    from fedge.server.app import run_server

    logging.getLogger("flwr").setLevel(logging.WARNING)
    folder = task.folder / policy
    if folder.exists():
        # A run cut short leaves its devices' inboxes and stores behind; feeding and
        # running over them would start from its state. Every run starts clean.
        log.info("feddrift: clearing the unfinished run in %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenario_path = folder / "scenario.toml"
    scenario_path.write_text(to_toml(scenario_table(task, policy, cp_file)))
    cfg = load_config(scenario_path)
    run_config: dict[str, bool | float | int | str] = {
        "scenario": str(scenario_path),
        "overrides": "",
        "output-dir": str(task.folder),
        "run-dir": str(folder),
        "engine": "inprocess",
    }
    schedule = ConceptSchedule.from_cp_file(cp_file)
    feed_devices(cfg, folder)
    grid = InProcessGrid(client_app, schedule.n_clients, run_config)
    cluster_policy = OracleAssignment(schedule) if policy == "oracle" else None
    started = time.perf_counter()
    try:
        summary = run_server(
            grid, cfg, folder, on_tick=_quiet, engine="inprocess", cluster_policy=cluster_policy
        )
    finally:
        forget_devices()
    return measure(summary, schedule, grid.bytes_sent, grid.bytes_received, time.perf_counter() - started)


def _quiet(*_: Any) -> None:
    """No progress output from inside a run."""


def measure(
    summary: Mapping[str, Any],
    schedule: ConceptSchedule,
    bytes_sent: int,
    bytes_received: int,
    seconds: float,
) -> dict[str, Any]:
    """The benchmark's metrics of one run."""
    acc = {int(t["tick"]): t["accuracy"] for t in summary["ticks"]}
    over_time = [acc.get(t) for t in range(1, schedule.n_steps)]
    scored = [a for a in over_time if a is not None]
    fires = {int(t["tick"]): list(t["drifted"]) for t in summary["ticks"]}
    return {
        "accuracy": float(np.mean(scored)) if scored else float("nan"),
        "accuracy_over_time": over_time,
        "rounds": int(summary.get("rounds_used", 0)),
        "model_rounds": int(summary.get("model_rounds", 0)),
        "campaigns": len(summary["campaigns"]),
        "versions": len(summary["campaigns"]),
        "bytes_sent": int(bytes_sent),
        "bytes_received": int(bytes_received),
        "seconds": round(seconds, 2),
        "detection": score_detections(fires, schedule),
    }


def score_detections(
    fires: Mapping[int, Sequence[int]], schedule: ConceptSchedule, tolerance: int = DETECTION_TOLERANCE
) -> dict[str, Any]:
    """Score the devices' detector firings against the concept matrix.

    A firing of client ``c`` at tick ``t`` detects the earliest undetected drift
    ``(c, s)`` with ``s <= t < s + tolerance`` (delay ``t - s``); any other firing
    is a false alarm; a drift nobody detected in time is missed.

    Returns
    -------
    dict
        ``drifts``, ``detected``, ``missed``, ``false_alarms``, ``mean_delay`` and
        ``delays`` (per client, one list of delays each).
    """
    points = schedule.drift_points()
    open_drifts: dict[int, list[int]] = {}
    for client, step in points:
        open_drifts.setdefault(client, []).append(step)
    delays: dict[int, list[int]] = {c: [] for c in range(schedule.n_clients)}
    false_alarms = 0
    for tick in sorted(fires):
        for client in fires[tick]:
            pending = [s for s in open_drifts.get(client, []) if s <= tick < s + tolerance]
            if pending:
                step = pending[0]
                open_drifts[client].remove(step)
                delays[client].append(tick - step)
            else:
                false_alarms += 1
    flat = [d for per in delays.values() for d in per]
    return {
        "drifts": len(points),
        "detected": len(flat),
        "missed": len(points) - len(flat),
        "false_alarms": false_alarms,
        "mean_delay": float(np.mean(flat)) if flat else float("nan"),
        "delays": {str(c): v for c, v in delays.items()},
    }


def run_task(task: Task) -> list[dict[str, Any]]:
    """Every policy of one (dataset, matrix, seed)."""
    spec = dataset_spec(task.dataset)
    n_concepts = spec.n_concepts
    if task.cp_file is not None:
        cp_file, origin = task.cp_file, "given"
    else:
        cp_file, origin = matrix_file(task.matrix, n_concepts, task.folder.parent / "matrices")
    s = task.settings
    detector, params, setting = detector_setting(task.dataset, spec.generator, spec.params, s.detector, s.delta)
    rows = []
    for policy in task.policies:
        cpu = time.process_time()
        result = run_policy(task, policy, cp_file)
        result["cpu_seconds"] = round(time.process_time() - cpu, 2)
        rows.append(
            {
                "dataset": task.dataset,
                "matrix": task.matrix,
                "matrix_source": origin,
                "policy": policy,
                "seed": task.seed,
                "detector": detector,
                "detector_params": params,
                "detector_setting": setting,
                **result,
            }
        )
    return rows


# -- the whole table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """What to run.

    Parameters
    ----------
    datasets : sequence of str
        Datasets (keys of :data:`DEFAULT_MATRIX`).
    seeds : int
        Seeds 0 .. seeds - 1.
    policies : sequence of str
        Policies (of :data:`POLICIES`).
    matrices : mapping, optional
        Dataset -> matrix name (``A``..``F``, ``W``..``Z``, ``R0``..); default
        :data:`DEFAULT_MATRIX`.
    jobs : int
        Worker processes.
    settings : Settings
        Training budget.
    """

    datasets: tuple[str, ...] = DATASETS
    seeds: int = 3
    policies: tuple[str, ...] = POLICIES
    matrices: Mapping[str, str] | None = None
    jobs: int = 2
    settings: Settings = Settings()

    def tasks(self, folder: Path) -> list[Task]:
        """One task per dataset and seed."""
        matrices = {**DEFAULT_MATRIX, **(self.matrices or {})}
        return [
            Task(
                d, matrices.get(d, "A"), seed, tuple(self.policies),
                folder / "runs" / f"{_slug(d)}-{_slug(matrices.get(d, 'A'))}-s{seed}", self.settings,
            )
            for d in self.datasets
            for seed in range(self.seeds)
        ]


def run_benchmark(
    bench: Benchmark, folder: Path, *, on_task: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """Run every task (in ``bench.jobs`` processes) and return one row per run."""
    for name in bench.datasets:
        dataset_spec(name)  # an unknown dataset or parameter fails here, before any run
    for name in bench.policies:
        if name not in POLICIES:
            raise ValueError(f"feddrift: unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
    return run_tasks(bench.tasks(folder), bench.jobs, on_task=on_task)


def run_tasks(
    tasks: Sequence[Task], jobs: int, *, on_task: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """Run ``tasks`` in ``jobs`` processes; one row per policy run."""
    for task in tasks:
        matrix_file(task.matrix, dataset_spec(task.dataset).n_concepts, task.folder.parent / "matrices")
    rows: list[dict[str, Any]] = []
    if jobs <= 1:
        for task in tasks:
            done = run_task(task)
            rows.extend(done)
            if on_task is not None:
                on_task(done)
        return rows
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for done in pool.map(run_task, tasks):
            rows.extend(done)
            if on_task is not None:
                on_task(done)
    return rows
