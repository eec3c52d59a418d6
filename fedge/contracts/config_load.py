"""Reading, overriding and checking a run configuration (:class:`FedgeConfig`).

:func:`load_config` reads a scenario TOML file (:func:`read_toml`), applies
``section.key=value`` overrides (:func:`apply_overrides`) and builds the
configuration (:func:`from_dict`): every value is coerced to its field's type
and held to the bounds the schema in :mod:`fedge.contracts.config` declares,
free-form tables are bounded, and the components a name refers to (detector,
scenario) are built once so that a mistake fails before anything starts. Every
mistake is a :class:`~fedge.contracts.config.ConfigError` of one line. Also here:
the guards for names and paths that come from a configuration
(:func:`check_name`, :func:`inside`) and the run folder (:func:`new_run_dir`).
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
from pathlib import Path
from typing import Any, get_type_hints

from fedge.contracts.config import (
    MAX_DEVICE_TICKS,
    MAX_EXPERIMENT_LENGTH,
    MAX_NAME_LENGTH,
    MAX_SCENARIO_BYTES,
    MAX_SCENARIO_ROWS,
    MAX_SEED,
    MAX_STRING_LENGTH,
    MAX_TABLE_DEPTH,
    MAX_TABLE_INT,
    MIN_SECURE_DEVICES,
    PROJECT_ROOT,
    ROBUST_STRATEGIES,
    ConfigError,
    FedgeConfig,
)

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
    cfg = _shaped(cfg)
    _check_components(cfg)
    return cfg


def _shaped(cfg: FedgeConfig) -> FedgeConfig:
    """Fill in what the devices' own data determines (see :class:`~fedge.contracts.config.DataConfig`)."""
    if cfg.data.source == "scenario" and not cfg.data.path and not cfg.data.module:
        return cfg
    from fedge.scenarios.user_data import DataError, shaped_config

    try:
        return shaped_config(cfg)
    except DataError as exc:
        raise ConfigError(_one_line(exc)[:400]) from None


def _check_components(cfg: FedgeConfig) -> None:
    """Build what the names refer to, so a bad detector or schedule fails now."""
    from clients.monitor import make_detector
    from fedge.scenarios import build_source

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
        scenario = build_source(cfg)
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
