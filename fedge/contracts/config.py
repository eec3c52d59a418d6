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
    [model]               hidden, layers
    [tracking]            uri, experiment, model_name
    [run]                 output_dir, resume
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A configuration mistake, explained in one line."""


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _at_least(low: float) -> dict[str, Any]:
    return {"min": low}


def _between(low: float, high: float) -> dict[str, Any]:
    return {"min": low, "max": high}


@dataclass(frozen=True)
class ScenarioConfig:
    """Where the devices' data comes from and how it drifts."""

    name: str = "sine2-sudden"
    generator: str = field(default="sine2", metadata=_choice("sine2", "circle2", "sea4", "digits-swap"))
    seed: int = 0
    clients: int = field(default=6, metadata=_at_least(1))
    ticks: int = field(default=16, metadata=_at_least(1))
    samples_per_tick: int = field(default=100, metadata=_at_least(1))
    bad_row_fraction: float = field(default=0.02, metadata=_between(0.0, 0.5))
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "sudden", "at": 8})
    generator_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    """The on-device drift monitor and the bounded sample window."""

    detector: str = "ADWIN"
    params: dict[str, Any] = field(default_factory=dict)
    window: int = field(default=500, metadata=_at_least(10))
    reset_window_on_drift: bool = True


@dataclass(frozen=True)
class TriggerConfig:
    """When the server starts a retraining campaign.

    ``quorum`` below 1 is a fraction of the polled devices, 1 or more a count.
    """

    policy: str = field(default="quorum", metadata=_choice("quorum", "periodic", "always", "never"))
    quorum: float = field(default=0.3, metadata=_at_least(0.0))
    cooldown: int = field(default=2, metadata=_at_least(0))
    period: int = field(default=4, metadata=_at_least(1))


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
    assumed_malicious: int = field(default=0, metadata=_at_least(0))
    trim_beta: float = field(default=0.2, metadata=_between(0.0, 0.49))
    rounds: int = field(default=4, metadata=_at_least(1))
    participants: str = field(default="all", metadata=_choice("all", "drifted"))
    local_epochs: int = field(default=4, metadata=_at_least(1))
    lr: float = field(default=0.01, metadata=_between(1e-6, 10.0))
    batch_size: int = field(default=32, metadata=_at_least(1))
    proximal_mu: float = field(default=0.01, metadata=_at_least(0.0))
    server_lr: float = field(default=0.05, metadata=_between(1e-6, 10.0))
    holdout_every: int = field(default=5, metadata=_at_least(2))
    min_improvement: float = field(default=0.0, metadata=_between(-1.0, 1.0))
    initial_rounds: int = field(default=8, metadata=_at_least(1))
    warm_start: bool = False
    compression: str = field(default="none", metadata=_choice("none", "float16", "int8"))
    min_devices: int = field(default=1, metadata=_at_least(1))


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
    secagg_shares: float = field(default=1.0, metadata=_at_least(0.01))
    secagg_threshold: float = field(default=0.6, metadata=_at_least(0.01))
    dp: str = field(default="none", metadata=_choice("none", "central-server", "central-client", "local"))
    noise_multiplier: float = field(default=1.0, metadata=_between(0.01, 1000.0))
    clipping_norm: float = field(default=1.0, metadata=_between(1e-6, 1e6))
    local_epsilon: float = field(default=1.0, metadata=_between(1e-3, 100.0))
    epsilon_budget: float = field(default=10.0, metadata=_between(1e-3, 1e6))
    delta: float = field(default=1e-5, metadata=_between(1e-12, 0.1))


@dataclass(frozen=True)
class ModelConfig:
    """The feed-forward classifier trained on the devices."""

    hidden: int = field(default=32, metadata=_at_least(1))
    layers: int = field(default=2, metadata=_between(1, 8))


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where runs and the model registry live.

    An empty ``uri`` means a SQLite file under ``run.output_dir``; an empty
    ``model_name`` means ``fedge-<scenario name>``.
    """

    uri: str = ""
    experiment: str = "fedge"
    model_name: str = ""


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
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {', '.join(choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{key}: {value!r} is out of range; must be {bound}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} is out of range; must be between {low} and {high}")
    return value


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

    try:
        make_detector(cfg.monitor.detector, cfg.monitor.params)
    except ValueError as exc:
        raise ConfigError(_one_line(exc)) from None
    try:
        build_scenario(cfg.scenario)
    except (ValueError, OSError) as exc:
        raise ConfigError(_one_line(exc)) from None
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
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = key.split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. trigger.policy")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
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
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p.resolve()


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a scenario file with a one-line error for a missing or malformed file."""
    p = resolve_path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"scenario file {str(path)!r}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario file {str(path)!r}: invalid TOML ({exc})") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FedgeConfig:
    """Load a scenario file (or the embedded defaults) and apply overrides."""
    data = read_toml(path) if path else {}
    return from_dict(apply_overrides(data, overrides))


def split_overrides(text: str) -> list[str]:
    """Split the ``overrides`` run-config string (``;``-separated) into items."""
    return [item.strip() for item in text.split(";") if item.strip()]
