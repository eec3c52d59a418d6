"""One model retrained on a mix of concepts must not replace a champion that serves the devices better."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.feddrift import Settings, Task, scenario_table
from fedge.contracts.protocol import DriftReport
from fedge.core.orchestrator import Orchestrator
from fedge.core.ports import CampaignOutcome, Deployed, RoundMetrics
from fedge.core.triggers import DriftQuorum


class _MixedConcepts:
    """Four devices; from tick 1, two drift. Retraining the one model on the mix makes it worse.

    The champion (``w = 0``) still gets the two silent devices right (about 70 % on
    the holdout of all four); a candidate trained on both concepts gets about 55 %.
    """

    def __init__(self) -> None:
        self.served: list[float] = []

    def poll(self, tick: int, deployment: Mapping[int, Deployed], default: Any) -> list[DriftReport]:
        model = deployment.get(0)
        self.served.append(float(model.weights["w"][0]) if model is not None else float("nan"))
        drift = tick >= 1
        version = model.version if model is not None else 0
        return [
            DriftReport(d, tick, version, 100, 50 if drift and d < 2 else 5, drift and d < 2, 1, 0, 100)
            for d in range(4)
        ]

    def score(self, tick: int, models: Mapping[int, Any]) -> dict[int, dict[int, float]]:
        return {}

    def campaign(
        self, devices: Sequence[int], start: Any, *, tick: int, rounds: int, first_round: int, lineage: str
    ) -> CampaignOutcome:
        first = float(start["w"][0]) == 9.0
        cand, champ, w = (0.9, float("nan"), 0.0) if first else (0.55, 0.70, 1.0)
        rm = tuple(RoundMetrics(first_round + r, 0.1, cand, 0.1, champ, len(devices)) for r in range(rounds))
        return CampaignOutcome({"w": np.array([w])}, rm, len(devices))

    def versions(self) -> list[dict[str, Any]]:
        return []


class _Registry:
    def __init__(self) -> None:
        self.tags: list[dict[str, str]] = []
        self.aliases: dict[str, int] = {}

    def register(self, weights: Any, tags: Mapping[str, str]) -> int:
        self.tags.append(dict(tags))
        return len(self.tags)

    def set_alias(self, version: int, alias: str) -> None:
        self.aliases[alias] = version

    def load(self, alias: str) -> Any:
        return None

    def versions(self) -> list[dict[str, Any]]:
        return []


class _Tracker:
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        pass


def _run(min_improvement: float) -> tuple[_MixedConcepts, _Registry]:
    fed, reg = _MixedConcepts(), _Registry()
    orch = Orchestrator(
        fed, reg, _Tracker(), DriftQuorum(quorum=0.3, cooldown=0), {"w": np.array([9.0])},
        rounds=2, initial_rounds=2, min_improvement=min_improvement,
    )
    orch.run(range(4))
    return fed, reg


def test_a_triggered_candidate_worse_on_the_devices_is_registered_but_never_promoted() -> None:
    fed, reg = _run(0.0)
    assert len(reg.tags) >= 2, "the drift triggered retraining campaigns"
    assert all(t["fedge.promoted"] == "false" for t in reg.tags[1:])
    assert reg.aliases == {"champion": 1}, "the champion alias stays on the model that serves better"
    assert fed.served[1:] == [0.0, 0.0, 0.0], "devices keep being served the champion"


def test_the_open_gate_is_what_let_mixed_retraining_through() -> None:
    fed, reg = _run(-1.0)
    assert reg.aliases["champion"] > 1 and fed.served[-1] == 1.0


def test_the_benchmark_runs_drift_triggered_with_the_gate_closed(tmp_path: Path) -> None:
    cp = tmp_path / "m.cp"
    cp.write_text("0 0\n1 0\n")
    task = Task("sine2", "m", 0, ("drift-triggered",), tmp_path, Settings(), cp_file=cp)
    table = scenario_table(task, "drift-triggered", cp)
    assert table["campaign"]["min_improvement"] >= 0.0
    assert table["trigger"]["policy"] == "quorum"
