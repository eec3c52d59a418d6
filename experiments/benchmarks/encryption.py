"""Item 7: what sealing the samples at rest costs a device per tick.

One store seals every row with AES-256-GCM, as a device does; the other is the same
store with the cipher swapped for one that only frames the bytes (same record sizes,
same SQL, same transactions), so the difference is the encryption alone. A tick is
what a device does with its store each monitoring tick: append the tick's samples
(100 rows of 10 features by default) to a full window, trimming the oldest, and read
the window back (1,000 rows) for the prequential check and training. Repetitions
alternate between the two stores, so a busy spell on a shared machine hits both.

The ingest inbox is measured the same way: per tick the device application appends
the tick's rows (100 rows of 10 features) and the device takes and prunes them, each
opening the inbox as they do (so the key check on open is counted), sealed against
framed.

``python -m experiments.benchmarks.encryption`` prints the figures alone.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np

from clients.crypto import NONCE_BYTES, TAG_BYTES
from clients.inbox import Inbox
from clients.store import DeviceStore
from experiments.benchmarks.common import Figure


class _FramingOnly:
    """Stands in for :class:`clients.crypto.RecordCipher` without encrypting.

    Records keep the sealed size (nonce and tag as zeros), so the plaintext store
    writes and reads exactly as many bytes as the encrypted one.
    """

    _NONCE = bytes(NONCE_BYTES)
    _TAG = bytes(TAG_BYTES)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        return self._NONCE + plaintext + self._TAG

    def seal_many(self, plaintexts: list[bytes], associated: list[bytes]) -> list[bytes]:
        return [self._NONCE + p + self._TAG for p in plaintexts]

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        return sealed[NONCE_BYTES:-TAG_BYTES]

    def open_many(self, sealed: list[bytes], associated: list[bytes]) -> list[bytes]:
        return [s[NONCE_BYTES:-TAG_BYTES] for s in sealed]


def _store(path: Path, window: int, encrypted: bool) -> DeviceStore:
    """The store at ``path``; the baseline's records are framed, not encrypted."""
    if encrypted:
        return DeviceStore(path, capacity=window)
    with mock.patch("clients.store.RecordCipher", lambda key: _FramingOnly()):
        return DeviceStore(path, capacity=window)


class Tick(NamedTuple):
    """Mean seconds per tick over one repetition: CPU of append and window, and wall."""

    append_cpu: float
    window_cpu: float
    wall: float

    @property
    def cpu(self) -> float:
        return self.append_cpu + self.window_cpu


def _ticks(store: DeviceStore, x: np.ndarray, y: np.ndarray, first: int, n: int) -> Tick:
    """Append ``x`` and read the window back, ``n`` times."""
    append = read = 0.0
    started = time.perf_counter()
    for tick in range(first, first + n):
        t0 = time.process_time()
        store.append(x, y, tick)
        t1 = time.process_time()
        store.window()
        read += time.process_time() - t1
        append += t1 - t0
    return Tick(append / n, read / n, (time.perf_counter() - started) / n)


def _open_seconds(path: Path, window: int, encrypted: bool) -> float:
    """CPU seconds to open a full store (which opens every record: authenticates it, if sealed)."""
    t0 = time.process_time()
    store = _store(path, window, encrypted)
    seconds = time.process_time() - t0
    store.close()
    return seconds


def _inbox_ticks(path: Path, x: np.ndarray, y: np.ndarray, first: int, n: int, sealed: bool) -> float:
    """CPU seconds per tick of the inbox's life: append by the application, take and prune by the device."""
    patch = contextlib.nullcontext() if sealed else mock.patch("clients.inbox.RecordCipher", lambda key: _FramingOnly())
    with patch:
        t0 = time.process_time()
        for tick in range(first, first + n):
            with Inbox(path, n_features=x.shape[1], n_classes=2) as inbox:
                inbox.append(tick, x, y)
            with Inbox(path) as inbox:
                batch = inbox.take()
                inbox.prune(batch.last_batch_id)
        return (time.process_time() - t0) / n


def inbox_figure(rows: int, features: int, ticks: int, repeat: int, x: np.ndarray, y: np.ndarray, folder: Path) -> Figure:
    """Per-tick inbox CPU, sealed vs framed, alternating repetitions."""
    runs: dict[bool, list[float]] = {True: [], False: []}
    paths = {flag: folder / ("inbox-sealed" if flag else "inbox-plain") / "device-0.inbox.sqlite" for flag in (True, False)}
    for i in range(repeat):
        for flag in (True, False):
            runs[flag].append(_inbox_ticks(paths[flag], x, y, i * ticks, ticks, flag))
    e, p = statistics.median(runs[True]), statistics.median(runs[False])
    ms = 1e3
    return Figure(
        "7 encryption",
        f"ingest inbox per tick, AES-GCM sealed vs framed ({rows} x {features} appended, taken, pruned)",
        (
            f"CPU {ms * e:.2f} ms vs {ms * p:.2f} ms; {repeat} x {ticks} ticks spread "
            f"{ms * min(runs[True]):.2f}-{ms * max(runs[True]):.2f} vs "
            f"{ms * min(runs[False]):.2f}-{ms * max(runs[False]):.2f} ms"
        ),
        f"{e / p:.2f}x CPU, +{ms * (e - p):.2f} ms per tick",
        "",
        None,
        {"sealed_inbox_tick_cpu_s": e, "plain_inbox_tick_cpu_s": p},
    )


def run(
    rows: int = 100, features: int = 10, window: int = 1000, ticks: int = 30, repeat: int = 5
) -> list[Figure]:
    """Per-tick store time with and without encryption, side by side.

    Parameters
    ----------
    rows, default=100
        Samples a tick appends.
    features, default=10
        Width of a sample.
    window, default=1000
        Samples the store keeps (and a tick reads back).
    ticks, default=30
        Ticks per repetition.
    repeat, default=5
        Repetitions per store, alternating between the two.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, features)).astype(np.float32)
    y = rng.integers(0, 2, rows)
    runs: dict[bool, list[Tick]] = {True: [], False: []}
    opens: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="fedge-bench-encryption-") as tmp:
        folder = Path(tmp)
        paths = {flag: folder / ("sealed" if flag else "plain") / "device-0.sqlite" for flag in (True, False)}
        stores = {flag: _store(paths[flag], window, flag) for flag in (True, False)}
        try:
            fill = -(-window // rows)  # ticks to fill the window, so every measured tick trims
            for store in stores.values():
                _ticks(store, x, y, 0, fill)
            for i in range(repeat):
                for flag, store in stores.items():
                    runs[flag].append(_ticks(store, x, y, fill + i * ticks, ticks))
        finally:
            for store in stores.values():
                store.close()
        for _ in range(repeat):
            for flag in (True, False):
                opens[flag].append(_open_seconds(paths[flag], window, flag))
        inbox = inbox_figure(rows, features, ticks, repeat, x, y, folder)

    def median(flag: bool, field: str) -> float:
        return statistics.median(getattr(t, field) for t in runs[flag])

    e, p = median(True, "cpu"), median(False, "cpu")
    cpu = {flag: [t.cpu for t in runs[flag]] for flag in (True, False)}
    open_e, open_p = min(opens[True]), min(opens[False])
    setup = f"{rows} x {features} appended, window of {window:,} read"
    ms = 1e3
    return [
        Figure(
            "7 encryption",
            f"store per tick, AES-GCM sealed vs plaintext ({setup})",
            (
                f"CPU {ms * e:.2f} ms vs {ms * p:.2f} ms (append {ms * median(True, 'append_cpu'):.2f}"
                f" vs {ms * median(False, 'append_cpu'):.2f}, window "
                f"{ms * median(True, 'window_cpu'):.2f} vs {ms * median(False, 'window_cpu'):.2f}); "
                f"{repeat} x {ticks} ticks spread {ms * min(cpu[True]):.2f}-{ms * max(cpu[True]):.2f}"
                f" vs {ms * min(cpu[False]):.2f}-{ms * max(cpu[False]):.2f} ms; wall "
                f"{ms * median(True, 'wall'):.2f} vs {ms * median(False, 'wall'):.2f} ms"
            ),
            f"{e / p:.2f}x CPU, +{ms * (e - p):.2f} ms per tick",
            "",
            None,
            {
                "sealed_tick_cpu_s": e,
                "plain_tick_cpu_s": p,
                "sealed_append_cpu_s": median(True, "append_cpu"),
                "plain_append_cpu_s": median(False, "append_cpu"),
                "sealed_window_cpu_s": median(True, "window_cpu"),
                "plain_window_cpu_s": median(False, "window_cpu"),
                "sealed_tick_wall_s": median(True, "wall"),
                "plain_tick_wall_s": median(False, "wall"),
            },
        ),
        Figure(
            "7 encryption",
            f"opening a full store ({window:,} samples): records authenticated vs only read",
            f"CPU {1e3 * open_e:.2f} ms vs {1e3 * open_p:.2f} ms",
            f"+{1e3 * (open_e - open_p):.2f} ms per open",
            "",
            None,
            {"sealed_open_s": open_e, "plain_open_s": open_p},
        ),
        inbox,
    ]


if __name__ == "__main__":
    for figure in run():
        print(f"{figure.name}: {figure.value}  [{figure.ratio}]")
