"""One typed, validated run configuration.

A configuration is read from a scenario TOML file, optionally changed by
``key=value`` overrides (``trigger.policy=periodic``), and checked before
anything starts. Every mistake becomes a :class:`ConfigError` whose message is
one line naming the key, the value and what is allowed.

The file layout mirrors the dataclasses below::

    [scenario]            name, generator, seed, clients, ticks, samples_per_tick, ...
    [scenario.schedule]   kind = "sudden" | "staggered" | "stationary" | "matrix", ...
    [scenario.generator_params]
    [monitor]             detector, window, reset_window_on_drift
    [monitor.params]      keyword arguments of the river detector
    [trigger]             policy, quorum, cooldown, period
    [campaign]            strategy, rounds, participants, local_epochs, lr, ...
    [clustering]          enabled, switch_margin, fit_margin, merge_distance, max_models
    [privacy]             secure_aggregation, secagg_shares, secagg_threshold, dp,
                          noise_multiplier, clipping_norm, local_epsilon, epsilon_budget, delta
    [model]               task, hidden, layers
    [tracking]            uri, experiment, model_name
    [run]                 output_dir, resume, reply_timeout, workers

Limits
------
Every count has an upper bound, checked by :func:`load_config` before anything
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
import math
import os
import re
import stat
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

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
#: Integers inside the free-form tables (schedule, generator and detector parameters).
MAX_TABLE_INT = 1_000_000
MAX_SCENARIO_BYTES = 1_000_000
MAX_STRING_LENGTH = 4_096
MAX_NAME_LENGTH = 100
MAX_EXPERIMENT_LENGTH = 256
#: Tables nest a few levels at most (``scenario.schedule``); deeper is a mistake.
MAX_TABLE_DEPTH = 8

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(key: str, value: str) -> str:
    """Refuse a name that could not safely be a single file or folder name.

    Parameters
    ----------
    key : str
        The dotted key, for the message.
    value : str
        The name: letters, digits, ``.``, ``_``, ``-``; a letter or digit first;
        at most :data:`MAX_NAME_LENGTH` characters.

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    ConfigError
        One line naming the key and the value.
    """
    if len(value) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{key}: {value[:40]!r}... is {len(value)} characters; at most {MAX_NAME_LENGTH}"
        )
    if not _NAME.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a valid name; use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, provided it stays inside ``root`` (symbolic links followed).

    Parameters
    ----------
    root : str or Path
        The folder ``path`` must not leave.
    path : str or Path
        A path built from ``root`` and names from the configuration.

    Returns
    -------
    Path
        The resolved ``path``.

    Raises
    ------
    ConfigError
        ``path`` resolves outside ``root`` or is not a valid path.

    Examples
    --------
    >>> inside("/srv/out", "/srv/out/sine2/run-1").as_posix()
    '/srv/out/sine2/run-1'
    >>> inside("/srv/out", "/srv/out/../etc")
    Traceback (most recent call last):
    ...
    fedge.contracts.config.ConfigError: /srv/out/../etc: leaves its folder /srv/out
    """
    try:
        base = Path(root).expanduser().resolve()
        target = Path(path).expanduser().resolve()
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{str(path)!r}: not a usable path ({_one_line(exc)})") from None
    if not target.is_relative_to(base):
        raise ConfigError(f"{path}: leaves its folder {base}")
    return target


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
    generator: str = field(default="sine2", metadata=_choice("sine2", "circle2", "sea4", "digits-swap"))
    seed: int = field(default=0, metadata=_between(0, MAX_SEED))
    clients: int = field(default=6, metadata=_between(1, MAX_CLIENTS))
    ticks: int = field(default=16, metadata=_between(1, MAX_TICKS))
    samples_per_tick: int = field(default=100, metadata=_between(1, MAX_SAMPLES_PER_TICK))
    bad_row_fraction: float = field(default=0.02, metadata=_between(0.0, 0.5))
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "sudden", "at": 8})
    generator_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    """The on-device drift monitor and the bounded sample window."""

    detector: str = "ADWIN"
    params: dict[str, Any] = field(default_factory=dict)
    window: int = field(default=500, metadata=_between(10, MAX_WINDOW))
    reset_window_on_drift: bool = True


@dataclass(frozen=True)
class TriggerConfig:
    """When the server starts a retraining campaign.

    ``quorum`` below 1 is a fraction of the polled devices, 1 or more a count.
    """

    policy: str = field(default="quorum", metadata=_choice("quorum", "periodic", "always", "never"))
    quorum: float = field(default=0.3, metadata=_between(0.0, MAX_CLIENTS))
    cooldown: int = field(default=2, metadata=_between(0, MAX_TICKS))
    period: int = field(default=4, metadata=_between(1, MAX_TICKS))


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
    initial_rounds: int = field(default=8, metadata=_between(1, MAX_ROUNDS))
    warm_start: bool = False
    compression: str = field(default="none", metadata=_choice("none", "float16", "int8"))
    min_devices: int = field(default=1, metadata=_between(1, MAX_CLIENTS))


@dataclass(frozen=True)
class ClusteringConfig:
    """Several models in service, one per cluster of devices (see :mod:`fedge.core.pool`).

    Off by default: one champion serves every device. On, devices whose detector
    fires are split onto a new model, a device is moved to the model that fits
    its latest samples, and models whose devices' data agree are merged
    (:class:`fedge.core.clustering.DriftClustering`). Each cluster is its own
    model lineage (registry alias ``cluster-<key>``, its own privacy ledger);
    the trigger policy decides per cluster, and a campaign trains a cluster on
    its own devices with the configured strategy and privacy settings.
    """

    enabled: bool = False
    switch_margin: float = field(default=0.1, metadata=_between(0.0, 1.0))
    fit_margin: float = field(default=0.1, metadata=_between(0.0, 1.0))
    merge_distance: float = field(default=0.05, metadata=_between(0.0, 1.0))
    max_models: int = field(default=6, metadata=_between(1, 8))


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
    """

    output_dir: str = "fedge-runs"
    resume: bool = True
    reply_timeout: float = field(default=600.0, metadata=_between(0.1, 86400.0))
    workers: int = field(default=1, metadata=_between(1, 64))


@dataclass(frozen=True)
class FedgeConfig:
    """The whole run configuration."""

    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    campaign: CampaignConfig = field(default_factory=CampaignConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> Any:
    origin = getattr(tp, "__origin__", tp)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {_short(value)}")
        _check_table(key, value, 1)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {_short(value)} is out of range") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        _check_string(key, value)
        if meta.get("name") and not (meta.get("empty") and value == ""):
            check_name(key, value)
        if meta.get("label"):
            if not value:
                raise ConfigError(f"{key}: must not be empty")
            if len(value) > MAX_EXPERIMENT_LENGTH:
                raise ConfigError(
                    f"{key}: {len(value)} characters; at most {MAX_EXPERIMENT_LENGTH}"
                )
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key}: {_short(value)} is out of range; must be {bound}")
    if high is not None and value > high:
        raise ConfigError(
            f"{key}: {_short(value)} is out of range; must be between {low} and {high}"
        )
    return value


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value, cut so that a huge number or string stays a short line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _check_string(key: str, value: str) -> None:
    if len(value) > MAX_STRING_LENGTH:
        raise ConfigError(f"{key}: a string of {len(value)} characters; at most {MAX_STRING_LENGTH}")
    found = _CONTROL.search(value)
    if found:
        raise ConfigError(
            f"{key}: {_short(value)} holds the control character {found.group()!r}; not allowed"
        )


def _check_table(key: str, value: Any, depth: int) -> None:
    """Bound what the free-form tables hold: they reach detectors, schedules and generators."""
    if depth > MAX_TABLE_DEPTH:
        raise ConfigError(f"{key}: nested more than {MAX_TABLE_DEPTH} levels deep")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_string(f"{key}.{k}", str(k))
            _check_table(f"{key}.{k}", v, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_table(f"{key}[{i}]", v, depth + 1)
    elif isinstance(value, str):
        _check_string(key, value)
    elif isinstance(value, int) and not isinstance(value, bool):
        is_seed = key.rsplit(".", 1)[-1] == "seed"
        low, high = (0, MAX_SEED) if is_seed else (-MAX_TABLE_INT, MAX_TABLE_INT)
        if not low <= value <= high:
            raise ConfigError(
                f"{key}: {_short(value)} is out of range; must be between {low} and {high}"
            )


def _section(cls: type, key: str, data: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}: unknown key; allowed: {', '.join(fields)}"
        )
    kwargs = {
        name: _coerce(f"{key}.{name}", value, hints[name], fields[name].metadata)
        for name, value in data.items()
    }
    for name, value in kwargs.items():
        default = fields[name].default_factory
        if isinstance(value, dict) and default is not dataclasses.MISSING and "kind" not in value:
            # A table given in part (``--set scenario.schedule.at=5``) keeps the
            # default's other keys.
            kwargs[name] = {**default(), **value}
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> FedgeConfig:
    """Build and validate a configuration from nested mappings."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a table, got {data!r}")
    hints = get_type_hints(FedgeConfig)
    sections = [f.name for f in dataclasses.fields(FedgeConfig)]
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; allowed: {', '.join(sections)}")
    kwargs = {}
    for name, value in data.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
        kwargs[name] = _section(hints[name], name, value)
    cfg = FedgeConfig(**kwargs)
    _check_components(cfg)
    return cfg


def _check_components(cfg: FedgeConfig) -> None:
    """Build what the names refer to, so a bad detector or schedule fails now."""
    from clients.monitor import make_detector
    from fedge.scenarios import build_scenario

    sc = cfg.scenario
    # Checked before the scenario is built: its schedule holds clients x ticks ids.
    if sc.clients * sc.ticks > MAX_DEVICE_TICKS:
        raise ConfigError(
            f"scenario.clients x scenario.ticks: {sc.clients} x {sc.ticks} = "
            f"{sc.clients * sc.ticks} is out of range; at most {MAX_DEVICE_TICKS}"
        )
    rows = sc.clients * sc.ticks * sc.samples_per_tick
    if rows > MAX_SCENARIO_ROWS:
        raise ConfigError(
            f"scenario.clients x scenario.ticks x scenario.samples_per_tick: {rows} rows is out "
            f"of range; at most {MAX_SCENARIO_ROWS}"
        )

    try:
        make_detector(cfg.monitor.detector, cfg.monitor.params)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(_one_line(exc)) from None
    try:
        scenario = build_scenario(cfg.scenario)
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        raise ConfigError(_one_line(exc)[:300]) from None
    if cfg.model.task:  # a user's task module is imported and its model tried on its input shape
        from fedge.contracts.task import TaskError, check_task, task_for

        try:
            check_task(task_for(cfg), scenario.n_features, scenario.n_classes)
        except TaskError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.trigger.quorum >= 1 and cfg.trigger.quorum != int(cfg.trigger.quorum):
        raise ConfigError(
            f"trigger.quorum: {cfg.trigger.quorum!r} is neither a fraction below 1 "
            "nor a whole device count"
        )
    _check_privacy(cfg)
    if cfg.campaign.min_devices > cfg.scenario.clients:
        raise ConfigError(
            f"campaign.min_devices: {cfg.campaign.min_devices} devices can never reply; "
            f"the scenario has {cfg.scenario.clients} clients"
        )
    if cfg.trigger.quorum > cfg.scenario.clients:
        raise ConfigError(
            f"trigger.quorum: {int(cfg.trigger.quorum)} devices can never agree; "
            f"the scenario has {cfg.scenario.clients} clients"
        )


ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum")

#: Fewest devices a secure round accepts: with two, each could subtract its own update.
MIN_SECURE_DEVICES = 3


def _check_privacy(cfg: FedgeConfig) -> None:
    """Refuse privacy settings that cannot work together, naming the keys."""
    pv, c = cfg.privacy, cfg.campaign
    if pv.secure_aggregation:
        from fedge.privacy.secagg_settings import secagg_config

        if c.strategy in ROBUST_STRATEGIES:
            raise ConfigError(
                f"privacy.secure_aggregation: campaign.strategy {c.strategy!r} needs each "
                "device's update, which secure aggregation hides; use fedavg, fedprox or fedadam"
            )
        if c.compression != "none":
            raise ConfigError(
                f"privacy.secure_aggregation: campaign.compression {c.compression!r} cannot "
                "compress masked updates; set campaign.compression=none"
            )
        if pv.dp == "central-server":
            raise ConfigError(
                "privacy.dp: 'central-server' clips each update in the clear; under secure "
                "aggregation use 'central-client'"
            )
        if cfg.scenario.clients < MIN_SECURE_DEVICES:
            raise ConfigError(
                f"privacy.secure_aggregation: needs at least {MIN_SECURE_DEVICES} devices, the "
                "scenario has "
                f"{cfg.scenario.clients}"
            )
        try:
            secagg_config(
                pv, equal_weights=pv.dp.startswith("central"), max_weight=cfg.monitor.window
            )
        except ValueError as exc:
            raise ConfigError(_one_line(exc)) from None
    if pv.dp in ("central-server", "central-client") and c.strategy in ROBUST_STRATEGIES:
        raise ConfigError(
            f"privacy.dp: central DP noise is calibrated to an average; campaign.strategy "
            f"{c.strategy!r} is not one"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {_short(text)}: expected section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = key.split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(
            f"override {_short(text)}: the key must be section.key, e.g. trigger.policy"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key}: the value is nested too deeply") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of nested ``data`` with the overrides applied."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = dict(child) if isinstance(child, Mapping) else {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def resolve_path(path: str | Path) -> Path:
    """Resolve a scenario path: as given, else relative to the project."""
    try:
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists():
            return p.resolve()
        candidate = PROJECT_ROOT / p
        return candidate if candidate.exists() else p.resolve()
    except (ValueError, OSError) as exc:
        raise ConfigError(f"scenario file {str(path)!r}: not a usable path ({_one_line(exc)})") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a scenario file, with a one-line error for every way it can be unusable.

    A missing file, a folder, something that is not a regular file (a FIFO or a
    device would block or never end), a file above :data:`MAX_SCENARIO_BYTES`,
    bytes that are not UTF-8 and malformed TOML are each refused before anything
    starts.
    """
    p = resolve_path(path)
    where = f"scenario file {str(path)!r}"
    try:
        # Opened without following a FIFO's writer: O_NONBLOCK only matters for those.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ConfigError(f"{where}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder; give a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or _one_line(exc)})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{where}: is a folder; give a TOML file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{where}: is not a regular file")
        if info.st_size > MAX_SCENARIO_BYTES:
            raise ConfigError(
                f"{where}: {info.st_size} bytes; a scenario file has at most {MAX_SCENARIO_BYTES}"
            )
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_SCENARIO_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read ({exc.strerror or _one_line(exc)})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ConfigError(f"{where}: a scenario file has at most {MAX_SCENARIO_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "a scenario is a TOML file"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML ({_one_line(exc)[:200]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid TOML (nested too deeply)") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FedgeConfig:
    """Load a scenario file (or the embedded defaults) and apply overrides."""
    data = read_toml(path) if path else {}
    return from_dict(apply_overrides(data, overrides))


def split_overrides(text: str) -> list[str]:
    """Split the ``overrides`` run-config string (``;``-separated) into items."""
    return [item.strip() for item in text.split(";") if item.strip()]


def new_run_dir(cfg: FedgeConfig) -> Path:
    """A fresh folder for one run: ``<output>/<scenario>/<timestamp>``, inside the output folder."""
    base = inside(cfg.output_dir, cfg.output_dir / cfg.scenario.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = base / stamp
    n = 1
    while folder.exists():
        n += 1
        folder = base / f"{stamp}-{n}"
    return inside(base, folder)
