"""The simulated device application: a scenario's rows go into each device's ingest inbox.

A real device application writes its samples with :mod:`clients.ingest`; the
runner and the launcher play that application for a scenario, through the same
API, so the ClientApp reads simulated and real data the same way. This lives on
the simulation side so that the device code never imports the scenarios.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clients.inbox import SCENARIO_SOURCE, Inbox, IngestError, Receipt, ingest
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
    skipped, so feeding twice stores nothing twice. ``scenario.label_fraction`` and
    ``scenario.label_delay`` say which rows come with a label and when
    (:class:`LabelAvailability`): a late label is appended with the tick it arrives
    at, and the device takes it only when it monitors that tick, so every tick can
    be written before the run starts. A label due after the scenario's last tick
    never arrives.

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
    spec = cfg.scenario
    scenario = build_scenario(spec)
    path = Path(path)
    last = -1
    if path.exists():
        with Inbox(path, n_features=scenario.n_features, n_classes=scenario.n_classes) as inbox:
            last = inbox.last_tick
            if inbox.origin == "device":
                # Refused even with nothing left to write: a run that reads these rows
                # must not take the generator's schedule for their truth.
                raise IngestError(
                    f"ingest: {path} holds the device application's own rows, but data.source is "
                    '"scenario"; set data.source = "inbox" (with data.n_features and data.n_classes) '
                    "to run on them"
                )
    wanted = range(scenario.n_steps) if ticks is None else ticks
    availability = LabelAvailability(spec.label_fraction, spec.label_delay, spec.seed, device_id)
    late: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def batches() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        # A generator: the rows of one tick at a time are in memory, however long the
        # scenario; only the positions and labels of rows whose label comes late are kept.
        for t in wanted:
            if t <= last:
                continue
            x, y = scenario.batch(device_id, t)
            given, held = availability.split(t, x, y, scenario.n_classes)
            if len(held[0]) and t + spec.label_delay < scenario.n_steps:
                late[t] = held
            yield t, x, given

    receipts = ingest(
        path,
        batches(),
        n_features=scenario.n_features,
        n_classes=scenario.n_classes,
        on_invalid="drop",
        source=SCENARIO_SOURCE,
    )
    if late:
        first_row = {r.tick: r.first_row for r in receipts}
        with Inbox(path) as inbox:
            # In increasing arrival tick, as the device's label cursor expects.
            for t in sorted(late):
                positions, labels = late[t]
                inbox.append_labels(
                    first_row[t] + positions, labels, tick=t + spec.label_delay, source=SCENARIO_SOURCE
                )
    return receipts


class LabelAvailability:
    """Which of a simulated device's rows come with a label, and when.

    A row is labelled with probability ``fraction`` (drawn per row, from a
    generator seeded by the scenario's seed, the device and the tick, so a fed
    scenario is the same every time). With ``delay`` 0 its label is ingested with
    it; with a larger delay the row is ingested unlabelled and its label appended
    ``delay`` ticks later (:meth:`clients.inbox.Inbox.append_labels`). Rows the
    device will drop (``bad_row_fraction``) keep their bad label, so they are
    still dropped and counted, never turned into unlabelled rows.

    Parameters
    ----------
    fraction : float
        Share of rows with a label, in [0, 1] (``scenario.label_fraction``).
    delay : int
        Ticks between a row and its label (``scenario.label_delay``).
    seed, device : int
        Seed the draw.
    """

    def __init__(self, fraction: float, delay: int, seed: int, device: int) -> None:
        self.fraction = float(fraction)
        self.delay = int(delay)
        self.seed = int(seed)
        self.device = int(device)

    def split(
        self, tick: int, x: np.ndarray, y: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """The labels to ingest with the rows of ``tick`` (NaN: none), and the late ones.

        Returns
        -------
        given : numpy.ndarray
            One label per row as float (NaN for a row ingested without one).
        held : tuple of numpy.ndarray
            Positions in the batch and labels of the rows whose label arrives
            ``delay`` ticks later (empty with ``delay`` 0).
        """
        if self.fraction >= 1.0 and self.delay == 0:
            return y, (_NO_ROWS, _NO_ROWS)
        y = np.asarray(y)
        valid = np.isfinite(np.asarray(x, dtype=np.float64)).all(axis=1)
        if n_classes:
            valid &= (y >= 0) & (y < n_classes)
        # Its own stream (the tag 0x1abe1): the scenario's rows do not change with the fraction.
        rng = np.random.default_rng([self.seed, self.device, int(tick), 0x1ABE1])
        labelled = valid & (rng.random(len(y)) < self.fraction)
        given = y.astype(np.float64)
        if self.delay == 0:
            given[valid & ~labelled] = np.nan
            return given, (_NO_ROWS, _NO_ROWS)
        given[valid] = np.nan
        positions = np.flatnonzero(labelled).astype(np.int64)
        return given, (positions, y[positions].astype(np.int64))


_NO_ROWS = np.zeros(0, dtype=np.int64)


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
        targets=data.targets,
    )
