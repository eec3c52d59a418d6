"""The simulated device application: a scenario's rows go into each device's ingest inbox.

A real device application writes its samples with :mod:`clients.ingest`; the
runner and the launcher play that application for a scenario, through the same
API, so the ClientApp reads simulated and real data the same way. This lives on
the simulation side so that the device code never imports the scenarios.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from clients.inbox import SCENARIO_SOURCE, Inbox, Receipt, ingest
from clients.sources import feed
from fedge.scenarios import build_scenario, build_source

if TYPE_CHECKING:
    from fedge.contracts.config import FedgeConfig


def feed_scenario(
    cfg: FedgeConfig, device_id: int, path: Path, ticks: Iterable[int] | None = None
) -> list[Receipt]:
    """Write a scenario device's rows for ``ticks`` (default: all) into its inbox.

    The scenario's bad rows (``bad_row_fraction``) are dropped and counted, as a
    device would count a faulty sensor's rows. Ticks already in the inbox are
    skipped, so feeding twice stores nothing twice.

    Parameters
    ----------
    cfg : FedgeConfig
        The run's configuration; its scenario is the data source.
    device_id : int
        Which device's rows.
    path : Path
        The device's inbox (see :func:`clients.ingest.inbox_path`); created if missing.
    ticks : iterable of int, optional
        Ticks to write, in increasing order; default every tick of the scenario.

    Returns
    -------
    list of Receipt
        One per stored batch.

    Notes
    -----
    With ``data.source`` other than ``"scenario"`` the device's own data is fed
    instead (:func:`feed_user_data`): no generated row is ever written then.
    """
    if cfg.data.source != "scenario":
        return feed_user_data(cfg, device_id, path, ticks)
    scenario = build_scenario(cfg.scenario)
    path = Path(path)
    last = -1
    if path.exists():
        with Inbox(path, n_features=scenario.n_features, n_classes=scenario.n_classes) as inbox:
            last = inbox.last_tick
    wanted = range(scenario.n_steps) if ticks is None else ticks
    # A generator: the rows of one tick at a time are in memory, however long the scenario.
    batches = ((t, *scenario.batch(device_id, t)) for t in wanted if t > last)
    return ingest(
        path,
        batches,
        n_features=scenario.n_features,
        n_classes=scenario.n_classes,
        on_invalid="drop",
        source=SCENARIO_SOURCE,
    )


def feed_user_data(
    cfg: FedgeConfig, device_id: int, path: Path, ticks: Iterable[int] | None = None
) -> list[Receipt]:
    """Write device ``device_id``'s own rows (``[data]``) into its inbox, up to the run's last tick.

    Only ticks after the inbox's last one are written, so feeding again after
    new files arrived stores only those. ``ticks`` (a range) bounds the last tick.
    """
    if cfg.data.source == "inbox":
        return []  # the device's own application fills its inbox
    data = build_source(cfg)
    last = max(ticks) if ticks is not None else data.n_steps - 1
    return feed(
        data.source(device_id),
        Path(path),
        n_features=data.n_features,
        n_classes=data.n_classes,
        through_tick=last,
    )
