"""Item 9: the fleet register and ``fedge fleet`` at 1,000 and 10,000 devices.

Simulated health reports (every device answers every tick; 1 in 20 drifts, 1 in
50 is under the accuracy floor, 1 in 100 answers with an error) go through the
server's :class:`~fedge.server.fleet.FleetRegister` as the federation feeds it:
``observe`` per reply, ``end_tick`` (statuses, counts, the append to
``fleet.jsonl``) per tick. Measured per fleet size, in one run so the sizes
compare like with like: memory the register holds per device (tracemalloc,
after the ticks), seconds to observe one tick of the whole fleet, and what
``fedge fleet RUN_DIR`` does: read the register back from the run folder
and render its table (to a discarded terminal of 120 columns).
"""

from __future__ import annotations

import gc
import io
import tempfile
import time
import tracemalloc
from pathlib import Path

from experiments.benchmarks.common import Figure

SIZES = (1_000, 10_000)


def _feed(register: object, n: int, tick: int) -> None:
    """One tick of ``n`` simulated replies into ``register``."""
    from fedge.contracts.protocol import DeviceHealth, DriftReport

    for d in range(n):
        if d % 100 == 7:
            register.observe_error(tick, d, "RuntimeError: simulated")  # type: ignore[attr-defined]
            continue
        drifting = (d + tick) % 20 == 0
        report = DriftReport(d, tick, 1 + tick // 3, 100, 10, drifting, int(drifting), tick // 5, 1000)
        health = DeviceHealth(
            device=d, tick=tick, model_version=1 + tick // 3, model_verified=True,
            ticks_since_report=1, live_accuracy=0.1 if d % 50 == 3 else 0.9, drifting=drifting,
            drifts_total=tick // 5, store_rows=1000, outbox_reports=1, handler_seconds=0.01,
            resident_bytes=80 << 20, uptime_seconds=60.0 * tick,
        )
        register.observe(tick, report, health)  # type: ignore[attr-defined]


def measure(n: int, ticks: int = 5) -> dict[str, float]:
    """Bytes per device, seconds per observed tick, seconds to load and to render."""
    from rich.console import Console

    from fedge.console_fleet import fleet_table, open_register
    from fedge.contracts.config import FleetConfig
    from fedge.server.fleet import FLEET_FILE, FleetRegister

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Memory in one pass, time in another: tracemalloc slows every allocation.
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        traced = FleetRegister(FleetConfig(degraded_floor=0.5), None)
        for tick in range(ticks):
            _feed(traced, n, tick)
            traced.end_tick(tick)
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        del traced
        register = FleetRegister(FleetConfig(degraded_floor=0.5), folder / FLEET_FILE)
        per_tick = []
        for tick in range(ticks):
            started = time.perf_counter()
            _feed(register, n, tick)
            register.end_tick(tick)
            per_tick.append(time.perf_counter() - started)
        started = time.perf_counter()
        loaded = open_register(folder)
        load = time.perf_counter() - started
        console = Console(file=io.StringIO(), width=120, force_terminal=False)
        started = time.perf_counter()
        console.print(fleet_table(loaded))  # what `fedge fleet` shows: the first 200 rows
        render = time.perf_counter() - started
        started = time.perf_counter()
        console.print(fleet_table(loaded, limit=0))  # --limit 0: every device
        render_all = time.perf_counter() - started
        assert len(loaded.devices) == n
    return {
        "bytes_per_device": held / n,
        "tick_seconds": min(per_tick[1:]) if len(per_tick) > 1 else per_tick[0],
        "load_seconds": load,
        "render_seconds": render,
        "render_all_seconds": render_all,
    }


def run(sizes: tuple[int, ...] = SIZES, ticks: int = 5) -> list[Figure]:
    """Per size: memory per device, tick, load and render; the ratio against the smallest."""
    measured = {n: measure(n, ticks) for n in sizes}
    small = measured[sizes[0]]
    figures = []
    for n, m in measured.items():
        scale = n / sizes[0]

        def ratio(key: str, m: dict[str, float] = m, scale: float = scale) -> str:
            # Per-device cost relative to the smallest fleet: 1.0x is linear scaling.
            if scale == 1:
                return "1.0x (per device)"
            per = 1.0 if key == "bytes_per_device" else scale
            return f"{m[key] / small[key] / per:.2f}x per device vs {sizes[0]:,}"

        figures += [
            Figure("9 fleet", f"{n:,} devices, register memory per device",
                   f"{m['bytes_per_device'] / 1024:.1f} KiB", ratio("bytes_per_device"),
                   "", None),
            Figure("9 fleet", f"{n:,} devices, observe one tick (and append fleet.jsonl)",
                   f"{1e3 * m['tick_seconds']:.0f} ms", ratio("tick_seconds"),
                   "< 5 s at 10,000" if n >= 10_000 else "",
                   (m["tick_seconds"] < 5) if n >= 10_000 else None),
            Figure("9 fleet", f"{n:,} devices, `fedge fleet`: read {ticks} ticks of the register",
                   f"{m['load_seconds']:.2f} s", ratio("load_seconds"), "", None),
            Figure("9 fleet", f"{n:,} devices, `fedge fleet`: render the table (its first 200 rows)",
                   f"{m['render_seconds']:.2f} s", "",
                   "< 10 s at 10,000" if n >= 10_000 else "",
                   (m["render_seconds"] < 10) if n >= 10_000 else None),
            Figure("9 fleet", f"{n:,} devices, `fedge fleet --limit 0`: render every row",
                   f"{m['render_all_seconds']:.2f} s", ratio("render_all_seconds"),
                   "< 10 s at 10,000" if n >= 10_000 else "",
                   (m["render_all_seconds"] < 10) if n >= 10_000 else None),
        ]
    return figures


if __name__ == "__main__":
    for figure in run():
        print(f"{figure.name}: {figure.value} ({figure.ratio})")
