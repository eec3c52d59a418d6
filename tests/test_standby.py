"""The replaced champion on standby: when the old concept returns, the old model serves again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedge.console import print_summary
from fedge.runner import RunRequest, quiet_tick, run
from fedge.tracking import list_model_versions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CLIENTS = 6
#: Concept 1 from tick 6 (the quorum retrains on it), concept 0 again from tick 9,
#: inside the trigger's cooldown: no campaign can repair the champion before tick 11.
CONCEPTS = [0] * 6 + [1] * 3 + [0] * 2
BACK = 9


def _run(tmp: Path, *extra: str, on_tick: Any = quiet_tick, run_dir: Path | None = None) -> dict[str, Any]:
    cp = tmp / "flip-and-back.cp"
    cp.write_text("".join(" ".join([str(c)] * CLIENTS) + "\n" for c in CONCEPTS))
    scenario = tmp / "flip-and-back.toml"
    sudden = (EXPERIMENTS / "sine2_sudden.toml").read_text()
    scenario.write_text(sudden.replace('kind = "sudden"\nat = 8', f'kind = "matrix"\nfile = "{cp}"'))
    overrides = (
        f"scenario.clients={CLIENTS}",
        f"scenario.ticks={len(CONCEPTS)}",
        "scenario.bad_row_fraction=0.0",
        "trigger.cooldown=4",
        f'run.output_dir="{tmp}"',
        *extra,
    )
    return run(RunRequest(scenario, overrides), on_tick=on_tick, run_dir=run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {
        "off": _run(tmp_path_factory.mktemp("standby-off"), "campaign.standby_z=0"),
        "on": _run(tmp_path_factory.mktemp("standby-on")),
    }


def _acc(summary: dict[str, Any], tick: int) -> float:
    return next(t["accuracy"] for t in summary["ticks"] if t["tick"] == tick)


def test_without_standby_the_returned_concept_waits_for_the_cooldown(runs: dict[str, dict[str, Any]]) -> None:
    off = runs["off"]
    promoted = [c for c in off["campaigns"] if c["promoted"] and c["tick"] > 0]
    assert promoted and all(c["tick"] < BACK for c in promoted), "one retraining on concept 1, before the return"
    assert off["rollbacks"] == []
    assert _acc(off, BACK + 1) < 0.3, "the champion of concept 1 is wrong on concept 0"


def test_the_replaced_champion_serves_again_the_tick_after_its_concept_returns(
    runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    on = runs["on"]
    assert _acc(on, BACK - 1) > 0.85, "the retrained champion fits concept 1"
    (back,) = on["rollbacks"]
    assert back["tick"] == BACK
    assert back["restored"] == 1 and back["demoted"] == on["campaigns"][1]["version"]
    assert back["standby_acc"] > 0.85 and back["champion_acc"] < 0.3
    assert back["samples"] == CLIENTS * 100 and back["devices"] == CLIENTS
    assert _acc(on, BACK + 1) > 0.85
    assert on["champion"] == 1
    aliases = {v["version"]: v["aliases"] for v in list_model_versions(on["tracking_uri"], "fedge-sine2-sudden")}
    assert "champion" in aliases[1]
    assert "standby" in aliases[back["demoted"]], "the demoted version waits on standby in its turn"
    print_summary(on)
    assert f"Rolled back at tick {BACK}" in capsys.readouterr().out


def test_a_restarted_server_keeps_the_standby_it_had(tmp_path: Path) -> None:
    class Died(Exception):
        pass

    def die_before_the_return(rec: Any, campaign: Any) -> None:
        if rec.tick == BACK - 1:
            raise Died

    folder = tmp_path / "run"
    with pytest.raises(Died):
        _run(tmp_path, on_tick=die_before_the_return, run_dir=folder)
    resumed = _run(tmp_path, run_dir=folder)
    assert resumed["ticks"][0]["tick"] == 0 and len(resumed["ticks"]) == len(CONCEPTS)
    (back,) = resumed["rollbacks"]
    assert back["tick"] == BACK and back["restored"] == 1
    assert _acc(resumed, BACK + 1) > 0.85



def test_a_tick_without_labels_sends_no_scoring_message() -> None:
    from types import SimpleNamespace

    from fedge.core.records import RunRecord, TickRecord
    from fedge.core.standby import Standby, watch_standby

    asked: list[int] = []

    class Devices:
        def score_counts(self, tick: int, models: Any) -> dict[int, tuple[int, dict[int, int]]]:
            asked.append(tick)
            return {0: (100, {0: 40, 1: 90})}  # the standby leads by 50 points

    def orch(n_scored: int) -> Any:
        record = RunRecord(ticks=[TickRecord(tick=7, accuracy=None, drift_fraction=0.0, drifted=(),
                                             rejected=0, n_samples=100, champion=2, n_scored=n_scored)])
        return SimpleNamespace(standby=Standby(1, {}), champion=(2, {}), federation=Devices(), record=record,
                               pool={0: SimpleNamespace(version=2, weights={})}, standby_z=1.645,
                               registry=SimpleNamespace(set_alias=lambda *_: None), alias=lambda _: "champion",
                               tracker=SimpleNamespace(log_event=lambda *_: None))

    unlabelled = orch(n_scored=0)  # e.g. scenario.label_delay: this tick's labels come later
    watch_standby(unlabelled, 7)
    assert asked == [] and unlabelled.record.rollbacks == []
    labelled = orch(n_scored=100)
    watch_standby(labelled, 7)
    assert asked == [7] and labelled.record.rollbacks[0]["restored"] == 1 and labelled.record.champion == 1
