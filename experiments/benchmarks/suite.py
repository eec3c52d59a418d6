"""Run the benchmarks, print every figure with its ratio, write the Markdown table."""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from experiments.benchmarks.common import Figure, machine
from fedge.contracts.config import PROJECT_ROOT

DEFAULT_OUTPUT = PROJECT_ROOT / "docs" / "benchmarks.md"
BENCHMARKS = (
    "engine", "overhead", "aggregation", "device", "communication", "mlflow", "encryption",
    "label-free", "fleet",
)


def _plan(quick: bool) -> dict[str, Callable[[], list[Figure]]]:
    from experiments.benchmarks import (
        aggregation,
        communication,
        encryption,
        engine,
        fleet_scale,
        footprint,
        label_free,
        overhead,
        tracking_cost,
    )

    if quick:
        return {
            "engine": lambda: engine.run(sizes=(10, 100), rounds=2),
            "overhead": lambda: overhead.run(devices=10, rounds=10, repeat=2),
            "aggregation": lambda: aggregation.run(repeat=5),
            "device": footprint.run,
            "communication": lambda: communication.run(codecs=("none", "int8")),
            "mlflow": lambda: tracking_cost.run(versions=2, ticks=20),
            "encryption": lambda: encryption.run(ticks=10, repeat=3),
            "label-free": lambda: label_free.run(n_ticks=20),
            "fleet": lambda: fleet_scale.run(sizes=(100, 1_000), ticks=3),
        }
    return {
        "engine": lambda: engine.run(sizes=(10, 100, 1000), rounds=2),
        "overhead": lambda: overhead.run(devices=20, rounds=20, repeat=3),
        "aggregation": lambda: aggregation.run(repeat=10),
        "device": footprint.run,
        "communication": communication.run,
        "mlflow": tracking_cost.run,
        "encryption": encryption.run,
        "label-free": label_free.run,
        "fleet": fleet_scale.run,
    }


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def markdown(
    figures: Sequence[Figure],
    host: dict[str, str],
    seconds: float,
    mode: str,
    kept_rows: Sequence[str] = (),
    notes: str = "",
    kept_from: str = "",
) -> str:
    """The results page: machine, then one table row per figure.

    ``kept_rows`` are table rows of benchmarks not run this time (from the
    previous page, whose run ``kept_from`` describes); ``notes`` is the previous
    page's hand-written notes section.
    """
    lines = [
        "# fedge benchmarks",
        "",
        (
            "Measured by `fedge bench` (`python -m experiments.benchmarks`); every ratio "
            "compares two things measured side by side in the same run. Regenerate with "
            "`fedge bench` (about 10 minutes on 2 cores) or `fedge bench --quick`."
        ),
        "",
        (
            f"Machine: {host['cpu']}, {host['cores']} cores, {host['ram']} RAM, {host['os']}; "
            f"Python {host['python']}, flwr {host['flwr']}, torch {host['torch']}, "
            f"numpy {host['numpy']}, ray {host['ray']}, mlflow {host['mlflow']}, "
            f"river {host['river']}."
        ),
        f"Mode: {mode}; the suite took {seconds:.0f} s; load average {host['load']} at the start."
        + (f" The other rows are kept from an earlier run ({kept_from})." if kept_rows else ""),
        "",
        "| # | figure | measured | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = list(kept_rows)
    for f in figures:
        cells = (f.item, f.name, f.value, f.ratio, f.target, _verdict(f.met))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += sorted(rows, key=_row_number)  # stable: each benchmark's rows keep their order
    page = "\n".join(lines) + "\n"
    if notes:
        page += "\n" + notes.strip("\n") + "\n"
    return page + METHOD


def _row_number(row: str) -> int:
    item = row[2:].split(" ", 1)[0]
    return int(item) if item.isdigit() else len(BENCHMARKS) + 1


NOTES_HEADING = "## Notes"


def _previous_page(path: Path, rerun: Sequence[str]) -> tuple[list[str], str, str]:
    """From an existing page: rows of the benchmarks not in ``rerun`` (none when
    ``rerun`` is empty), the notes section, and what the page says of its run."""
    if not path.exists():
        return [], "", ""
    text = path.read_text(encoding="utf-8")
    numbers = {str(BENCHMARKS.index(name) + 1) for name in rerun}
    kept = []
    if rerun:
        for line in text.splitlines():
            if line.startswith("| ") and not line.startswith(("| # ", "| --- ")):
                item = line[2:].split(" ", 1)[0]
                if item.isdigit() and item not in numbers:
                    kept.append(line)
    found = re.search(r"^Mode: (.*?)(?: The other rows are kept from .*)?$", text, re.MULTILINE)
    kept_from = found.group(1).rstrip(".") if found else "an earlier run"
    notes = ""
    if NOTES_HEADING in text:
        start = text.index(NOTES_HEADING)
        end = text.find("\n## ", start + len(NOTES_HEADING))
        notes = text[start : end if end >= 0 else len(text)]
    return kept, notes, kept_from


METHOD = """
## How each figure is measured

1. **Engine**: one monitoring tick, then one campaign of FedAvg rounds over all
   devices, same scenario and seed on every engine: the in-process engine with
   one worker process per core (`InProcessGrid(..., workers=N)`) and in one
   process, and Flower's Ray simulation. Seconds per round are Flower's own
   strategy clock (rounds only, no start-up). "identical" means every tick
   accuracy and the campaign's candidate accuracy agree exactly across all
   three. "device handlers" is the time the devices' ClientApp handlers took
   per round, summed over devices (in one process): the work every engine has
   to do somewhere.
2. **Overhead**: `run_server` (monitoring tick, campaign, evaluation of
   candidate and champion, MLflow registry and tracking, summary and plot)
   against Flower's `FedAvg.start` over a hand-rolled ClientApp
   (`experiments/benchmarks/bare_app.py`) with the same model, data, rounds
   and clients, both on the in-process grid in one process; the runs are
   interleaved and each figure is the best of the repeats. CPU is this
   process's CPU time over the same span (other jobs on a shared machine do
   not inflate it; waiting for the disk does not count). The last row gives
   the device audit log its previous durability, one `fsync` per message.
3. **Aggregation**: `strategies.aggregation.aggregate_arrayrecords` against
   `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` on the same
   records, both on one BLAS thread. The bound is the bytes that must move at
   the speed one core streams them, measured in the same run: every update
   read once (a BLAS dot product over each update's own bytes, in place) plus
   the result written once (filling a buffer of its size). A NumPy copy's
   bandwidth is shown beside it.
4. **Device**: peak resident memory (`VmHWM`) of a fresh process serving one
   node's tick and training round; detector cost over 20,000 errors fed in
   ticks of 100; store write and read of 1,000 rows of 10 features.
5. **Communication**: every message of the `sine2_sudden` scenario serialised
   with Flower's protobuf encoding; accuracy is the mean prequential accuracy
   over the ticks with a deployed model.
6. **MLflow**: a SQLite store in a temporary folder; "queued" is the time
   `Tracker.log_metrics` takes on the caller's path, "blocking" a synchronous
   `log_batch` of the same metrics; every queued metric is read back after
   `Tracker.end`.
7. **Encryption**: the on-device store sealing every sample row with AES-256-GCM
   against the same store whose cipher only frames the bytes (same record sizes,
   same SQL and transactions), so the difference is the encryption alone. A tick
   appends 100 rows of 10 features to a full window of 1,000 (trimming the
   oldest) and reads the window back; CPU time of this process, median over 5
   repetitions of 30 ticks that alternate between the two stores, with the
   spread of the repetitions. Opening is the best of 5 opens of the full store
   (the sealed one authenticates every record before the device uses it).
8. **Label-free**: `experiments/benchmarks/label_free.py`; every detector fed
   the same ticks of 100 rows in one run: the label-based ADWIN their 0/1
   errors, the prediction monitor (ADWIN on the max-probability stream and the
   calibrated estimate) two-class probabilities, the input tests the rows
   against a reference of 200 (KS per feature with Holm, MMD with 200
   permutations). Per sample is the tick's time over its 100 rows.
9. **Fleet**: `experiments/benchmarks/fleet_scale.py`; simulated health reports
   of 1,000 and 10,000 devices for 5 ticks through the server's fleet register
   (observe per reply, statuses and the `fleet.jsonl` append per tick), then
   `fedge fleet`'s read-back and table render. Memory per device is what
   tracemalloc sees the register hold; ratios are per device against 1,000
   (1.0x: linear).
"""


def run_suite(
    only: Sequence[str] = (), *, quick: bool = False, output: Path | None = DEFAULT_OUTPUT
) -> list[Figure]:
    """Run the chosen benchmarks (all by default), print them, write ``output``."""
    console = Console()
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; allowed: {', '.join(BENCHMARKS)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    host = machine()
    console.print(
        f"[bold]Machine[/]: {host['cpu']}, {host['cores']} cores, {host['ram']} RAM, {host['os']}\n"
        f"Python {host['python']}, flwr {host['flwr']}, torch {host['torch']}, "
        f"numpy {host['numpy']}, ray {host['ray']}, mlflow {host['mlflow']}",
        highlight=False,
    )
    started = time.perf_counter()
    figures: list[Figure] = []
    for name, bench in _plan(quick).items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        console.print(f"running [bold]{name}[/] …")
        found = bench()
        for f in found:
            console.print(f"  {f.name}: {f.value}  [bold]{f.ratio}[/]  {_verdict(f.met)}", highlight=False)
        console.print(f"  ({time.perf_counter() - t0:.0f} s)")
        figures.extend(found)
    seconds = time.perf_counter() - started
    table = Table(title="fedge benchmarks", title_justify="left")
    for col in ("#", "figure", "measured", "ratio", "target", "verdict"):
        table.add_column(col)
    for f in figures:
        table.add_row(f.item, f.name, f.value, f.ratio, f.target, _verdict(f.met))
    console.print(table)
    if output is not None:
        mode = "quick" if quick else "default"
        if only:
            mode += f" ({', '.join(only)})"
        output.parent.mkdir(parents=True, exist_ok=True)
        kept, notes, kept_from = _previous_page(output, [name for name in BENCHMARKS if name in only])
        output.write_text(markdown(figures, host, seconds, mode, kept, notes, kept_from))
        console.print(f"Wrote {output}")
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m experiments.benchmarks [--quick] [--only NAME ...] [--output FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, about 3 minutes")
    parser.add_argument("--only", nargs="*", default=[], choices=BENCHMARKS, help="run only these")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown table file")
    args = parser.parse_args(argv)
    run_suite(args.only, quick=args.quick, output=args.output)
