"""Soak benchmark: does a long run stay flat in memory and lose no model version?

Two runs of SINE-2 with the concept flipping every ``--period`` ticks on every
device (a drift, a campaign, a new model version each time):

* **in-process**: ``--devices`` (20) devices for ``--ticks`` (500) ticks in one
  process (the ServerApp, the 20 ClientApps and their stores). The process's
  resident set is printed at the start, every ``--every`` ticks and at the end,
  with the size of the devices' stores on disk.
* **deployment**: a shorter run on a local Flower deployment (SuperLink with TLS
  and SuperNode authentication, one SuperNode per device, an MLflow server):
  ``--deploy-devices`` devices for ``--deploy-ticks`` ticks. The resident sets
  of the ServerApp process, the SuperLink and every SuperNode are sampled from
  ``/proc`` while it runs (each message's ClientApp process is short-lived; its
  peak is printed too).

Each run ends by checking that every campaign's model version is in the
registry, and that the registry holds nothing else. This is a benchmark, not a
test: it prints figures and exits non-zero only when a version is missing.

Run it with ``python -m experiments.soak`` (about 15 minutes on 2 cores),
``--quick`` for a few minutes, ``--skip-deployment`` for the in-process half.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.core.records import CampaignRecord, TickRecord


def rss_mib(pid: int | str = "self") -> float:
    """Resident set of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def schedule_file(folder: Path, devices: int, ticks: int, period: int) -> Path:
    """A FedDrift ``.cp`` file: every device flips concept every ``period`` ticks."""
    rows = [" ".join(str((t // period) % 2) for _ in range(devices)) for t in range(ticks)]
    path = folder / f"flip-every-{period}.cp"
    path.write_text("\n".join(rows) + "\n")
    return path


def overrides(out: Path, devices: int, ticks: int, period: int, *extra: str) -> list[str]:
    """The soak scenario: the concept flips every ``period`` ticks on every device."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        f'run.output_dir="{out}"',
        'scenario.name="soak"',
        f"scenario.clients={devices}",
        f"scenario.ticks={ticks}",
        'scenario.schedule.kind="matrix"',
        f'scenario.schedule.file="{schedule_file(out, devices, ticks, period)}"',
        "scenario.bad_row_fraction=0.01",
        "campaign.rounds=2",
        "campaign.initial_rounds=3",
        "campaign.local_epochs=2",
        *extra,
    ]


def check_registry(summary: dict[str, Any], uri: str | None = None) -> tuple[int, int, list[int]]:
    """Campaign versions, registry versions, and campaign versions missing from the registry."""
    from fedge.tracking import list_model_versions

    listed = list_model_versions(uri or summary["tracking_uri"], summary["model_name"])
    registered = {int(v["version"]) for v in listed}
    campaigns = [int(c["version"]) for c in summary["campaigns"]]
    return len(campaigns), len(registered), sorted(set(campaigns) - registered)


def store_bytes(folder: Path) -> int:
    """Bytes of every device's store, audit log and inbox (with SQLite's side files)."""
    return sum(p.stat().st_size for p in (folder / "devices").glob("*") if p.is_file())


# -- in-process --------------------------------------------------------------------------------
def soak_inprocess(out: Path, devices: int, ticks: int, period: int, every: int) -> bool:
    from fedge.contracts.config_load import load_config
    from fedge.runner import RunRequest, feed_devices, run_inprocess

    items = tuple(overrides(out, devices, ticks, period))
    cfg = load_config(None, items)
    folder = out / "inprocess"
    feed_devices(cfg, folder)
    run_config = RunRequest(None, items, "inprocess").run_config(cfg, folder, "inprocess")
    started = time.perf_counter()
    samples: list[tuple[int, float, float, int]] = []
    print(f"\nin-process: {devices} devices x {ticks} ticks, concept flips every {period} ticks")
    print(f"{'tick':>6} {'wall s':>8} {'RSS MiB':>8} {'stores MiB':>10} {'versions':>9}")

    def sample(tick: int) -> None:
        row = (tick, time.perf_counter() - started, rss_mib(), store_bytes(folder))
        samples.append(row)
        print(f"{row[0]:>6} {row[1]:>8.1f} {row[2]:>8.1f} {row[3] / 2**20:>10.2f} {versions[0]:>9}", flush=True)

    versions = [0]
    sample(-1)

    def on_tick(rec: TickRecord, campaign: CampaignRecord | None) -> None:
        if campaign is not None:
            versions[0] += 1
        if rec.tick % every == every - 1 or rec.tick == ticks - 1:
            sample(rec.tick)

    summary = run_inprocess(cfg, run_config, folder, on_tick=on_tick)
    wall = time.perf_counter() - started
    n_campaigns, n_registered, missing = check_registry(summary)
    warm = next((s for s in samples if s[0] >= min(every, ticks) - 1), samples[0])
    print(
        f"in-process: {wall:.0f} s wall ({wall / ticks * 1000:.0f} ms per tick); RSS start "
        f"{samples[0][2]:.0f} MiB, after tick {warm[0]} {warm[2]:.0f} MiB, end {samples[-1][2]:.0f} MiB; "
        f"stores {samples[0][3] / 2**20:.1f} -> {samples[-1][3] / 2**20:.1f} MiB"
    )
    print(
        f"in-process: {n_campaigns} campaigns, {n_registered} versions in the registry, "
        f"missing {missing or 'none'}; late reports {len(summary.get('late_reports', []))}"
    )
    _write(out / "soak-inprocess.json", {"samples": samples, "wall_seconds": wall,
                                         "campaigns": n_campaigns, "registered": n_registered,
                                         "missing": missing})
    return not missing and n_campaigns == n_registered


# -- deployment --------------------------------------------------------------------------------
@dataclass
class ProcessSampler:
    """Samples the resident sets of a deployment's processes from ``/proc`` in a thread."""

    marker: str
    interval: float = 2.0
    rows: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    clientapp_peak: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _scan(self) -> dict[str, float]:
        from fedge.deploy.processes import MARKER_ENV

        needle = f"{MARKER_ENV}={self.marker}".encode()
        found: dict[str, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle not in env:
                continue
            name = _role(argv, env)
            if name is None:
                continue
            mib = rss_mib(entry)
            if name == "clientapp":
                self.clientapp_peak = max(self.clientapp_peak, mib)
                continue
            found[name] = found.get(name, 0.0) + mib
        return found

    def sample(self) -> dict[str, float]:
        row = self._scan()
        self.rows.append((time.monotonic(), row))
        return row

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def _role(argv: Sequence[bytes], env: Sequence[bytes]) -> str | None:
    text = b" ".join(argv)
    if b"flwr-clientapp" in text:
        return "clientapp"
    if b"flwr-serverapp" in text:
        return "serverapp"
    if b"flower-superlink" in text:
        return "superlink"
    if b"flower-supernode" in text:
        home = next((e.split(b"/")[-1].decode() for e in env if e.startswith(b"FLWR_HOME=")), "?")
        return home  # supernode-<i>
    if b"mlflow" in text and b"server" in text:
        return "mlflow (all its processes)"
    return None


def soak_deployment(out: Path, devices: int, ticks: int, period: int) -> bool:
    from fedge.contracts.config_load import load_config
    from fedge.deploy.launcher import start_deployment
    from fedge.deploy.runs import submit_run, wait_for_run
    from fedge.runner import feed_devices

    items = overrides(out, devices, ticks, period, "run.reply_timeout=120")
    cfg = load_config(None, items)
    folder = out / "deployment-run"
    feed_devices(cfg, folder)
    print(f"\ndeployment: {devices} SuperNodes x {ticks} ticks, concept flips every {period} ticks")
    started = time.perf_counter()
    dep = start_deployment(out / "deployment", out, devices)
    sampler = ProcessSampler(dep.group.marker)
    try:
        run_config: dict[str, object] = {
            "scenario": "",
            "overrides": ";".join([*items, f'tracking.uri="{dep.tracking_uri}"']),
            "output-dir": str(out),
            "run-dir": str(folder),
            "engine": "deployment",
        }
        base = sampler.sample()
        sampler.start()
        run_id = submit_run(dep, run_config)
        shown = [0.0]

        def on_wait(status: str) -> None:
            if time.monotonic() - shown[0] >= 60 and sampler.rows:
                shown[0] = time.monotonic()
                _print_row(time.perf_counter() - started, sampler.rows[-1][1])

        print(f"{'wall s':>8}  resident sets, MiB")
        _print_row(time.perf_counter() - started, base)
        status = wait_for_run(dep, run_id, 7200, on_wait, done_file=folder / "summary.json", poll=10.0)
        sampler.stop()
        end = sampler.rows[-1][1] if sampler.rows else {}
        _print_row(time.perf_counter() - started, end)
    finally:
        sampler.stop()
        dep.stop()
    if status != "finished:completed":
        print(f"deployment: run ended {status}")
        return False
    summary = json.loads((folder / "summary.json").read_text())
    wall = time.perf_counter() - started
    # The tracking server stopped with the deployment; its store is the SQLite file.
    n_campaigns, n_registered, missing = check_registry(summary, f"sqlite:///{out / 'mlflow.db'}")
    running = [row for _, row in sampler.rows if "serverapp" in row]
    first, last = (running[0], running[-1]) if running else ({}, {})
    nodes = sorted(k for k in first if k.startswith("supernode"))
    series = ", ".join(f"{row['serverapp']:.0f}" for row in running)
    print(
        f"deployment: {wall:.0f} s wall; ServerApp RSS over the run {series} MiB; "
        f"SuperLink {first.get('superlink', 0):.0f} -> "
        f"{last.get('superlink', 0):.0f} MiB; SuperNodes "
        + ", ".join(f"{first.get(n, 0):.0f}->{last.get(n, 0):.0f}" for n in nodes)
        + f" MiB; ClientApp process peak {sampler.clientapp_peak:.0f} MiB"
    )
    print(f"deployment: {n_campaigns} campaigns, {n_registered} versions in the registry, "
          f"missing {missing or 'none'}")
    _write(out / "soak-deployment.json", {"samples": sampler.rows, "wall_seconds": wall,
                                          "clientapp_peak": sampler.clientapp_peak,
                                          "campaigns": n_campaigns, "registered": n_registered,
                                          "missing": missing})
    return not missing and n_campaigns == n_registered


def _print_row(wall: float, row: dict[str, float]) -> None:
    parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row.items()))
    print(f"{wall:>8.0f}  {parts}", flush=True)


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak benchmark; returns 0 when every campaign's version is in the registry."""
    parser = _Parser(prog="python -m experiments.soak", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--ticks", type=int, default=500)
    parser.add_argument("--period", type=int, default=100, help="ticks between concept flips")
    parser.add_argument("--every", type=int, default=50, help="print a sample every N ticks")
    parser.add_argument("--deploy-devices", type=int, default=3)
    parser.add_argument("--deploy-ticks", type=int, default=12)
    parser.add_argument("--deploy-period", type=int, default=6)
    parser.add_argument("--skip-deployment", action="store_true")
    parser.add_argument("--skip-inprocess", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5 devices x 60 ticks; 2 x 6 deployed")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.ticks, args.period, args.every = 5, 60, 20, 10
        args.deploy_devices, args.deploy_ticks, args.deploy_period = 2, 6, 3
    for name in ("devices", "ticks", "period", "every", "deploy_devices", "deploy_ticks", "deploy_period"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    os.environ.setdefault("FEDGE_TELEMETRY", "0")
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedge-soak-") as tmp:
        out = (args.out or Path(tmp)).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        ok = True
        if not args.skip_inprocess:
            ok &= soak_inprocess(out / "inprocess", args.devices, args.ticks, args.period, args.every)
        if not args.skip_deployment:
            ok &= soak_deployment(
                out / "deployment", args.deploy_devices, args.deploy_ticks, args.deploy_period
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
