"""One typed, validated run configuration: the schema and its documented bounds.

This module is what a configuration *is*: one frozen dataclass per section,
each field's default and its allowed values (the field's ``metadata``), and the
upper bounds below. Reading a file, applying overrides and checking a
configuration live in :mod:`fedge.contracts.config_load`
(:func:`~fedge.contracts.config_load.load_config`). A new key is a new field
here, with its default and bounds; the loader picks it up from the dataclass.

A configuration is read from a scenario TOML file, optionally changed by
``key=value`` overrides (``trigger.policy=periodic``), and checked before
anything starts. Every mistake becomes a :class:`ConfigError` whose message is
one line naming the key, the value and what is allowed.

The file layout mirrors the dataclasses below::

    [scenario]            name, generator, seed, clients, ticks, samples_per_tick, ...
    [scenario.schedule]   kind = "sudden" | "staggered" | "stationary" | "matrix", ...
    [scenario.generator_params]
    [monitor]             detector, window, reset_window_on_drift, input_test,
                          input_alpha, input_correction, reference_size,
                          mmd_permutations, prediction, prediction_detector, calibrate
    [monitor.params]      keyword arguments of the river detector
    [trigger]             policy, quorum, cooldown, period, signals, accuracy_floor,
                          accuracy_source, memory
    [campaign]            strategy, rounds, participants, local_epochs, lr, ...
    [clustering]          enabled, switch_margin, fit_margin, split_z, drift_z, merge_distance, max_models,
                          fingerprint
    [privacy]             secure_aggregation, secagg_shares, secagg_threshold, dp,
                          noise_multiplier, clipping_norm, local_epsilon, epsilon_budget, delta
    [data]                source, path, module, n_features, n_classes, target
    [model]               task, hidden, layers
    [tracking]            uri, experiment, model_name
    [run]                 output_dir, resume, reply_timeout, workers
    [fleet]               stale_ticks, degraded_floor, history
    [rollout]             mode, canary, waves, hold_ticks, max_drop, failure_share,
                          min_failures

Limits
------
Every count has an upper bound, checked by :func:`~fedge.contracts.config_load.load_config` before anything
starts, so a typo such as ``ticks = 1600000000`` is a one-line error rather than
a run that fills the memory or never ends:

===============================================  ==========================
key                                              allowed
===============================================  ==========================
``scenario.seed``                                0 .. 4294967295 (2**32 - 1)
``scenario.clients``                             1 .. 10000
``scenario.ticks``                               1 .. 100000
``scenario.samples_per_tick``                    1 .. 100000
clients x ticks                                  at most 10 000 000
clients x ticks x samples_per_tick (rows fed)    at most 100 000 000
``monitor.window``                               10 .. 1000000
``monitor.reference_size``                       10 .. 10000
``monitor.mmd_permutations``                     10 .. 10000
``monitor.input_alpha``                          0.000001 .. 0.5
``trigger.cooldown``, ``trigger.period``         up to 100000
``campaign.rounds``, ``campaign.initial_rounds`` 1 .. 1000
``campaign.local_epochs``                        1 .. 1000
``campaign.batch_size``                          1 .. 100000
``campaign.holdout_every``                       2 .. 100000
``campaign.assumed_malicious``                   0 .. 10000
``privacy.secagg_shares``, ``secagg_threshold``  up to 10000
``model.hidden``                                 1 .. 1024
``model.layers``                                 1 .. 8
``run.workers``                                  1 .. 64
integers inside ``scenario.schedule``,           -1000000 .. 1000000
``scenario.generator_params``, ``monitor.params``  (a ``seed`` key: as ``scenario.seed``)
a scenario file                                  at most 1 MB of UTF-8 TOML
a string value                                   at most 4096 characters, no control characters
===============================================  ==========================

Names that become file or registry names (``scenario.name``, which names the
run folder ``<output_dir>/<scenario.name>/<timestamp>``, and
``tracking.model_name``, which names the state file) may hold letters, digits,
``.``, ``_`` and ``-`` only, start with a letter or digit and have at most 100
characters: ``../x``, ``/etc`` or a name with a NUL byte cannot write outside
the output folder. ``tracking.experiment`` is an MLflow experiment name, never a
path in fedge; it may hold any printable characters (a Databricks workspace
path such as ``/Users/me/fedge`` is one), at most 256.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration mistake, explained in one line."""


#: Upper bounds of the counts (see the module docstring's table for why each exists).
MAX_SEED = 2**32 - 1
MAX_CLIENTS = 10_000
MAX_TICKS = 100_000
MAX_SAMPLES_PER_TICK = 100_000
#: The schedule holds one concept id per device and tick.
MAX_DEVICE_TICKS = 10_000_000
#: Every row is written to a device's inbox before the run starts.
MAX_SCENARIO_ROWS = 100_000_000
MAX_WINDOW = 1_000_000
MAX_ROUNDS = 1_000
MAX_EPOCHS = 1_000
MAX_BATCH_SIZE = 100_000
MAX_HIDDEN = 1_024
#: A device row's width and a task's classes when the data is the user's own.
MAX_FEATURES = 1_000_000
MAX_CLASSES = 100_000
#: Integers inside the free-form tables (schedule, generator and detector parameters).
MAX_TABLE_INT = 1_000_000
MAX_SCENARIO_BYTES = 1_000_000
MAX_STRING_LENGTH = 4_096
MAX_NAME_LENGTH = 100
MAX_EXPERIMENT_LENGTH = 256
#: Tables nest a few levels at most (``scenario.schedule``); deeper is a mistake.
MAX_TABLE_DEPTH = 8


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def _between(low: float, high: float) -> dict[str, Any]:
    return {"min": low, "max": high}


@dataclass(frozen=True)
class ScenarioConfig:
    """Where the devices' data comes from and how it drifts."""

    name: str = field(default="sine2-sudden", metadata={"name": True})
    generator: str = field(
        default="sine2",
        metadata=_choice(
            "sine2", "circle2", "sea4", "digits-swap", "digits-shift", "segment-gain",
            "river-sea", "river-stagger", "river-agrawal", "river-hyperplane",
        ),
    )
    seed: int = field(default=0, metadata=_between(0, MAX_SEED))
    clients: int = field(default=6, metadata=_between(1, MAX_CLIENTS))
    ticks: int = field(default=16, metadata=_between(1, MAX_TICKS))
    samples_per_tick: int = field(default=100, metadata=_between(1, MAX_SAMPLES_PER_TICK))
    bad_row_fraction: float = field(default=0.02, metadata=_between(0.0, 0.5))
    #: Share of a simulated device's rows that come with a label (the others never get one).
    label_fraction: float = field(default=1.0, metadata=_between(0.0, 1.0))
    #: Ticks after its sample that a label arrives (0: with the row; > 0: as a late label).
    label_delay: int = field(default=0, metadata=_between(0, MAX_TICKS))
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "sudden", "at": 8})
    generator_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    """The on-device drift monitor and the bounded sample window.

    ``detector`` watches the prequential errors of labelled rows. The label-free
    signals (docs/monitoring.md) are off by default and combine with it:
    ``input_test`` tests each tick's inputs against a reference window of
    ``reference_size`` rows re-taken at every model install (``ks`` per feature
    with ``input_correction`` over the features, ``mmd`` one multivariate test
    with ``mmd_permutations``, ``auto`` KS up to 32 features, MMD above), flagged
    at ``input_alpha``; ``prediction`` feeds the model's per-sample
    ``confidence`` (max-probability) or normalised ``entropy`` to
    ``prediction_detector`` and reports an estimated accuracy (mean confidence,
    calibrated on the labelled holdout at install when ``calibrate``).
    """

    detector: str = "ADWIN"
    params: dict[str, Any] = field(default_factory=dict)
    window: int = field(default=500, metadata=_between(10, MAX_WINDOW))
    reset_window_on_drift: bool = True
    input_test: str = field(default="none", metadata=_choice("none", "auto", "ks", "mmd"))
    input_alpha: float = field(default=0.01, metadata=_between(1e-6, 0.5))
    input_correction: str = field(default="holm", metadata=_choice("bonferroni", "holm", "bh"))
    reference_size: int = field(default=200, metadata=_between(10, 10_000))
    mmd_permutations: int = field(default=200, metadata=_between(10, 10_000))
    prediction: str = field(default="none", metadata=_choice("none", "confidence", "entropy"))
    prediction_detector: str = field(
        default="ADWIN", metadata=_choice("ADWIN", "KSWIN", "PageHinkley")
    )
    calibrate: bool = True


@dataclass(frozen=True)
class TriggerConfig:
    """When the server starts a retraining campaign.

    ``quorum`` below 1 is a fraction of the polled devices, 1 or more a count.
    ``signals`` is which drift flags count toward it: ``label`` (the prequential
    detector), ``label-free`` (input or prediction drift) or ``either``.
    ``accuracy_floor`` above 0 starts a campaign, quorum or not, when a model's
    accuracy over its reporting devices is below it (a poor but stable
    champion); ``accuracy_source`` says which: ``measured`` (labelled rows),
    ``estimated`` (confidence) or ``either`` (measured where labels exist).
    ``memory`` above 1 lets a device whose detector fired in any of the last
    ``memory`` ticks (after the model's last campaign) count toward the quorum,
    so devices that drift at different ticks can still make one.
    """

    policy: str = field(default="quorum", metadata=_choice("quorum", "periodic", "always", "never"))
    quorum: float = field(default=0.3, metadata=_between(0.0, MAX_CLIENTS))
    cooldown: int = field(default=2, metadata=_between(0, MAX_TICKS))
    period: int = field(default=4, metadata=_between(1, MAX_TICKS))
    signals: str = field(default="either", metadata=_choice("label", "label-free", "either"))
    accuracy_floor: float = field(default=0.0, metadata=_between(0.0, 1.0))
    accuracy_source: str = field(
        default="either", metadata=_choice("measured", "estimated", "either")
    )
    memory: int = field(default=1, metadata=_between(1, MAX_TICKS))


@dataclass(frozen=True)
class CampaignConfig:
    """A retraining campaign: Flower strategy rounds, then the promotion gate.

    ``warm_start = false`` (default) retrains from fresh weights: a detected
    drift says the old concept no longer holds, and fine-tuning a confident
    model of it is slower and less reliable than learning anew.

    ``screen_updates`` refuses malformed, non-finite and outsized updates
    (norm above ``screen_norm_factor`` times the round's median) before any
    strategy aggregates; ``fedmedian``, ``fedtrimmedavg`` (``trim_beta``),
    ``krum`` and ``multikrum`` (``assumed_malicious`` devices) are Flower's
    robust aggregators.

    ``compression`` encodes the devices' train replies (``float16`` or ``int8``
    with error feedback, see :mod:`fedge.contracts.compression`); ``none`` sends weights.

    ``min_devices`` is how many of a campaign's devices must reply for a round
    to count; devices that do not answer within ``run.reply_timeout`` are left
    out of that round.

    ``min_labels``: training uses labelled samples only, and a device holding
    fewer labelled samples than this is left out of the campaign (the campaign
    record's ``too_few_labels`` names it; the device refuses a train message
    itself too). The gate evaluates on the labelled holdout only.

    ``gate_z`` above 0: a candidate must also beat the champion by that many
    standard errors of the paired accuracy difference on the holdout (a lead
    of a point on 100 samples is noise, see :mod:`fedge.core.gate`).

    ``standby_z`` (one model, no staged rollout): the champion a promotion
    replaces stays on standby (registry alias ``standby``); when, on the
    devices' newest samples, it leads the new champion by that many standard
    errors (default 1.645, one-sided 5 %), it serves again (see
    :mod:`fedge.core.standby`). 0 turns it off.
    """

    strategy: str = field(
        default="fedavg",
        metadata=_choice(
            "fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum"
        ),
    )
    screen_updates: bool = True
    screen_norm_factor: float = field(default=5.0, metadata=_at_least(1.0))
    assumed_malicious: int = field(default=0, metadata=_between(0, MAX_CLIENTS))
    trim_beta: float = field(default=0.2, metadata=_between(0.0, 0.49))
    rounds: int = field(default=4, metadata=_between(1, MAX_ROUNDS))
    participants: str = field(default="all", metadata=_choice("all", "drifted"))
    local_epochs: int = field(default=4, metadata=_between(1, MAX_EPOCHS))
    lr: float = field(default=0.01, metadata=_between(1e-6, 10.0))
    batch_size: int = field(default=32, metadata=_between(1, MAX_BATCH_SIZE))
    proximal_mu: float = field(default=0.01, metadata=_at_least(0.0))
    server_lr: float = field(default=0.05, metadata=_between(1e-6, 10.0))
    holdout_every: int = field(default=5, metadata=_between(2, MAX_TICKS))
    min_improvement: float = field(default=0.0, metadata=_between(-1.0, 1.0))
    gate_z: float = field(default=0.0, metadata=_between(0.0, 10.0))
    standby_z: float = field(default=1.645, metadata=_between(0.0, 10.0))
    initial_rounds: int = field(default=8, metadata=_between(1, MAX_ROUNDS))
    warm_start: bool = False
    compression: str = field(default="none", metadata=_choice("none", "float16", "int8"))
    min_devices: int = field(default=1, metadata=_between(1, MAX_CLIENTS))
    min_labels: int = field(default=1, metadata=_between(1, 10**9))


@dataclass(frozen=True)
class ClusteringConfig:
    """Several models in service, one per cluster of devices (see :mod:`fedge.core.pool`).

    Off by default: one champion serves every device. On, a device that no model
    fits significantly as well as that model fits its other devices (a z-test
    at ``split_z``, or ``drift_z`` once its detector fired) is split onto a new model, a device is moved to the model that fits
    its latest samples, and models whose devices' data agree are merged
    (:class:`fedge.core.clustering.DriftClustering`). Each cluster is its own
    model lineage (registry alias ``cluster-<key>``, its own privacy ledger);
    the trigger policy decides per cluster, and a campaign trains a cluster on
    its own devices with the configured strategy and privacy settings.
    Devices split at the same tick share one new model only when their scores
    agree on at least ``fingerprint`` models; else each starts its own and
    those that agree are merged at the next tick.
    """

    enabled: bool = False
    switch_margin: float = field(default=0.1, metadata=_between(0.0, 1.0))
    fit_margin: float = field(default=0.02, metadata=_between(0.0, 1.0))
    split_z: float = field(default=3.0, metadata=_between(0.0, 10.0))
    drift_z: float = field(default=1.5, metadata=_between(0.0, 10.0))
    merge_distance: float = field(default=0.05, metadata=_between(0.0, 1.0))
    max_models: int = field(default=6, metadata=_between(1, 8))
    fingerprint: int = field(default=2, metadata=_between(1, 8))


@dataclass(frozen=True)
class PrivacyConfig:
    """Secure aggregation and differential privacy of the campaigns (docs/privacy.md).

    ``secure_aggregation`` runs every training round under SecAgg+: the server
    sees masked vectors and their sum only. ``secagg_shares`` is each device's
    neighbourhood, a fraction of the round's devices (1.0: everyone) or a whole
    count above 2; ``secagg_threshold`` the shares that rebuild a secret, a
    fraction of the neighbourhood or a whole count of at least 2. It cannot be
    combined with a robust strategy or with compression, which need each update.

    ``dp`` adds differential privacy: ``central-server`` (Flower's server-side
    fixed clipping, updates in the clear), ``central-client`` (devices clip,
    the server adds the noise; works with secure aggregation) or ``local``
    (Flower's ``LocalDpMod`` on every device, ``local_epsilon`` per release).
    Central noise has std ``noise_multiplier * clipping_norm / devices``. A DP
    campaign averages the devices' updates with equal weights, the average the
    noise is calibrated to. Every campaign is charged to ``epsilon_budget`` at
    ``delta``; one that would exceed it does not start.
    """

    secure_aggregation: bool = False
    secagg_shares: float = field(default=1.0, metadata=_between(0.01, MAX_CLIENTS))
    secagg_threshold: float = field(default=0.6, metadata=_between(0.01, MAX_CLIENTS))
    dp: str = field(default="none", metadata=_choice("none", "central-server", "central-client", "local"))
    noise_multiplier: float = field(default=1.0, metadata=_between(0.01, 1000.0))
    clipping_norm: float = field(default=1.0, metadata=_between(1e-6, 1e6))
    local_epsilon: float = field(default=1.0, metadata=_between(1e-3, 100.0))
    epsilon_budget: float = field(default=10.0, metadata=_between(1e-3, 1e6))
    delta: float = field(default=1e-5, metadata=_between(1e-12, 0.1))


@dataclass(frozen=True)
class DataConfig:
    """Where the devices' rows come from.

    ``source = "scenario"`` (the default): ``[scenario]``'s generator plays every
    device's application. ``"folder"``: ``path`` holds one entry per device,
    ``device-0``, ``device-1``, ... (a folder of CSV, JSON-lines, ``.npz`` or
    Parquet files, or one such file; see :mod:`clients.sources`), and nothing is
    generated: ``scenario.clients`` and ``scenario.ticks`` are taken from the
    folder, and so are ``n_features`` and ``n_classes`` unless given (giving both
    skips reading the files when the configuration is loaded). ``"python"``:
    ``module`` is an importable module with ``N_FEATURES``, ``N_CLASSES`` and
    ``source(device_id)`` returning an object with ``batches()`` (or an iterable)
    of ``(tick, x, y)``; ``scenario.clients`` and ``scenario.ticks`` as configured.
    ``"inbox"``: each device's own application fills its inbox (``fedge-ingest``,
    :mod:`clients.ingest`); fedge writes nothing into it, and ``n_features`` and
    ``n_classes`` must be given (``n_classes`` only for a classifier).

    ``target`` is the kind of target the rows hold (:mod:`clients.targets`):
    ``"auto"`` (the default) takes the task's, class labels for a classifier,
    float targets for a regression with one output and vector targets for one
    with ``N_OUTPUTS = k``; ``"class"`` keeps whole-number labels as classes even
    for a one-output regression. Data whose targets do not fit the task (numbers
    with a fraction for a classifier, vectors of another length) is refused when
    the configuration is loaded. For float and vector targets ``n_classes`` is
    the number of values per row (1, or ``k``), filled in from the task.
    """

    source: str = field(default="scenario", metadata=_choice("scenario", "folder", "python", "inbox"))
    path: str = ""
    module: str = ""
    n_features: int = field(default=0, metadata=_between(0, MAX_FEATURES))
    n_classes: int = field(default=0, metadata=_between(0, MAX_CLASSES))
    target: str = field(default="auto", metadata=_choice("auto", "class", "float", "vector"))


@dataclass(frozen=True)
class ModelConfig:
    """The model the devices train: a task module (see :mod:`fedge.contracts.task`) or fedge's MLP.

    ``task`` is an import path (``"mypkg.task"``), importable on every device;
    empty means fedge's feed-forward classifier of ``hidden`` x ``layers``.
    """

    task: str = ""
    hidden: int = field(default=32, metadata=_between(1, MAX_HIDDEN))
    layers: int = field(default=2, metadata=_between(1, 8))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs and the model registry live.

    An empty ``uri`` means a SQLite file under ``run.output_dir``; an empty
    ``model_name`` means ``fedge-<scenario name>``.
    """

    uri: str = ""
    experiment: str = field(default="fedge", metadata={"label": True})
    model_name: str = field(default="", metadata={"name": True, "empty": True})


@dataclass(frozen=True)
class RunConfig:
    """Where results go, whether a restarted server resumes, how long it waits for devices.

    ``reply_timeout`` (seconds) bounds every wait for device replies: a poll, a
    strategy round. A device that has not answered by then is treated as offline
    for that message.

    ``workers`` (in-process engine only) runs the devices in that many worker
    processes, each device always in the same one; the numbers are the same
    as with one. Worth it when devices' training dominates a round (many
    devices, more cores). A worker that dies is not restarted: its devices
    stay unreachable for the rest of the run.

    ``model_public_key`` is the server's model-signing public key a device
    checks every model with; empty means ``<output_dir>/state/model-signing.pub``.

    ``client_app`` (``module:attribute``) is the ClientApp the in-process engine
    runs on every device, e.g. a team's own Flower app wrapped with
    :func:`clients.flower_app.with_fedge`; empty means fedge's own
    (``clients.client_app:app``). Flower's engines take theirs from the app's
    ``pyproject.toml`` (``[tool.flwr.app.components] clientapp``).
    """

    output_dir: str = "fedge-runs"
    client_app: str = ""
    model_public_key: str = ""
    resume: bool = True
    reply_timeout: float = field(default=600.0, metadata=_between(0.1, 86400.0))
    workers: int = field(default=1, metadata=_between(1, 64))


@dataclass(frozen=True)
class FleetConfig:
    """The server's fleet register (docs/fleet.md).

    A device not heard from for ``stale_ticks`` ticks is ``stale``; one whose
    live accuracy is below ``degraded_floor`` is ``degraded`` (0 turns that
    off). ``history`` is how many entries per device the register keeps in
    memory (the run folder's ``fleet.jsonl`` keeps them all).
    """

    stale_ticks: int = field(default=3, metadata=_between(1, MAX_TICKS))
    degraded_floor: float = field(default=0.6, metadata=_between(0.0, 1.0))
    history: int = field(default=200, metadata=_between(1, 100_000))


@dataclass(frozen=True)
class RolloutConfig:
    """How a promoted model reaches the devices (docs/fleet.md).

    ``immediate``: every device gets it at the next poll. ``staged``: a
    ``canary`` cohort first (a fraction below 1 of the devices, or a whole
    count), then ``waves`` widening waves, the last of which reaches every
    device and moves the ``champion`` alias. A wave widens once the cohort's
    live accuracy over ``hold_ticks`` ticks holds against the devices still on
    the champion (same ticks); the rollout rolls back when it falls short by
    more than ``max_drop``, or when more than ``failure_share`` of the cohort
    (and at least ``min_failures`` devices) fail to install it or error.
    """

    mode: str = field(default="immediate", metadata=_choice("immediate", "staged"))
    canary: float = field(default=0.2, metadata=_between(0.0, MAX_CLIENTS))
    waves: int = field(default=1, metadata=_between(1, 100))
    hold_ticks: int = field(default=2, metadata=_between(1, MAX_TICKS))
    max_drop: float = field(default=0.05, metadata=_between(0.0, 1.0))
    failure_share: float = field(default=0.3, metadata=_between(0.0, 1.0))
    min_failures: int = field(default=1, metadata=_between(1, MAX_CLIENTS))

    def __post_init__(self) -> None:
        if self.canary <= 0 or (self.canary >= 1 and self.canary != int(self.canary)):
            raise ConfigError(
                f"rollout.canary: {self.canary!r} is neither a fraction in (0, 1) "
                "nor a whole device count"
            )


@dataclass(frozen=True)
class FedgeConfig:
    """The whole run configuration."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def __post_init__(self) -> None:
        if self.rollout.mode == "staged" and self.clustering.enabled:
            raise ConfigError(
                "rollout.mode: staged rolls out one model; clustering.enabled serves one per "
                "cluster (set rollout.mode = \"immediate\")"
            )

    @property
    def model_name(self) -> str:
        """Registered model name in MLflow."""
        return self.tracking.model_name or f"fedge-{self.scenario.name}"

    @property
    def output_dir(self) -> Path:
        """Absolute output folder."""
        return Path(self.run.output_dir).expanduser().resolve()

    def flat(self) -> dict[str, Any]:
        """Dotted ``section.key`` view, used for MLflow params."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                if isinstance(value, dict):
                    for k, v in value.items():
                        out[f"{section.name}.{f.name}.{k}"] = v
                else:
                    out[f"{section.name}.{f.name}"] = value
        return out


ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")

#: Fewest devices a secure round accepts: with two, each could subtract its own update.
MIN_SECURE_DEVICES = 3
