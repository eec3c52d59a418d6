"""What a restarted orchestrator needs: the saved counters and pool, and versions that landed.

The pool is saved without weights; they are in the registry under each
cluster's alias. A campaign whose version was registered after the last save
(the process died in between) is found by the run's ``fedge.run_key`` tag and
adopted, never registered again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedge.core.pool import Cluster
from fedge.core.rollout import restore_rollout
from fedge.core.standby import restore_standby
from fedge.core.triggers import DriftMemory

if TYPE_CHECKING:
    from fedge.core.orchestrator import Orchestrator

log = logging.getLogger("fedge.server")

#: Version tag naming the run (across restarts) a model version was registered by.
RUN_KEY_TAG = "fedge.run_key"
STATE_FORMAT = 2


def snapshot(orch: Orchestrator, finished: bool = False) -> dict[str, Any]:
    """The counters and the pool a restarted orchestrator needs, JSON-ready."""
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "run_id": orch.run_id,
        "run_key": orch.run_key,
        "tick": orch.last_tick,
        "finished": finished,
        "rounds_done": orch.rounds_done,
        "model_rounds": orch.model_rounds,
        "last_registered": orch.last_registered,
        "last_campaign": orch.last_campaign,
        "champion": orch._champion_version(),
        "pool": [c.saved() for c in orch.pool.values()],
        "assignment": {str(d): k for d, k in orch.assignment.items()},
        "drift_memory": orch.drift_memory.saved(),
        "policy": repr(orch.policy),
    }
    checkpoint = getattr(orch.federation, "checkpoint", None)
    if callable(checkpoint):
        state["federation"] = checkpoint()
    if orch.rollout is not None:
        state["rollout"] = orch.rollout.saved()
    if orch.standby is not None:
        state["standby"] = orch.standby.saved()
    return state

def restore(orch: Orchestrator, ticks: list[int]) -> list[int]:
    """Continue an interrupted run from the saved state; returns the ticks left."""
    saved = orch.state.load() if orch.state is not None and orch.resume else None
    if not saved:
        return ticks
    if saved.get("format") != STATE_FORMAT or saved.get("finished", True):
        return ticks
    if saved.get("run_id") != orch.run_id:
        log.info(
            "the last run of this model (%s) stopped after tick %s; this is a new run",
            saved.get("run_id"),
            saved.get("tick"),
        )
        return ticks
    orch.run_key = str(saved["run_key"])
    orch.rounds_done = int(saved.get("rounds_done", 0))
    orch.model_rounds = int(saved.get("model_rounds", orch.rounds_done))
    orch.last_registered = int(saved.get("last_registered", 0))
    for entry in saved.get("pool", []):
        c = Cluster(
            int(entry["key"]),
            dict(orch.initial_weights),
            int(entry["version"]),
            int(entry["created"]),
            int(entry["last_used"]),
            tuple(int(d) for d in entry.get("devices", [])),
            None if entry.get("split_from") is None else int(entry["split_from"]),
            int(entry.get("origin_version", 0)),
            None if entry.get("last_campaign") is None else int(entry["last_campaign"]),
        )
        orch.pool[c.key] = c
    orch.assignment = {int(d): int(k) for d, k in dict(saved.get("assignment", {})).items()}
    orch.drift_memory = DriftMemory(saved.get("drift_memory") or {})
    restore = getattr(orch.federation, "restore", None)
    if callable(restore) and isinstance(saved.get("federation"), Mapping):
        restore(saved["federation"])
    done = saved.get("tick")
    done = adopt_landed(orch, -1 if done is None else int(done))
    load_weights(orch)
    restore_rollout(orch, saved)
    restore_standby(orch, saved)
    orch.last_tick = done if done >= 0 else None
    left = [t for t in ticks if t > done]
    orch.record.resumed_at = left[0] if left else None
    if orch.single and orch.champion is not None:
        orch.record.champion = orch.record.resumed_from = orch.champion[0]
    log.info(
        "resuming the run after tick %d: %d rounds done, %d model(s) in the pool, "
        "last registered version %d",
        done,
        orch.rounds_done,
        len(orch.pool),
        orch.last_registered,
    )
    orch.tracker.log_event(
        "resumed",
        done + 1,
        {
            "after_tick": done,
            "rounds_done": orch.rounds_done,
            "pool": [c.saved() for c in orch.pool.values()],
            "last_registered": orch.last_registered,
            "recovered": list(orch.record.recovered),
        },
    )
    return left

def load_weights(orch: Orchestrator) -> None:
    """Each trained cluster's weights, from the registry version under its alias."""
    for key, cluster in list(orch.pool.items()):
        if cluster.version <= 0:
            continue
        found = orch.registry.load(orch.alias(key))
        if found is None:
            log.warning(
                "cluster %d: alias %r is missing from the registry; it starts fresh",
                key,
                orch.alias(key),
            )
            cluster.version = 0
            continue
        version, weights = found
        if version != cluster.version:
            log.warning(
                "cluster %d: the registry serves v%d, the saved state v%d; taking the registry's",
                key,
                version,
                cluster.version,
            )
        cluster.version, cluster.weights = version, weights

def adopt_landed(orch: Orchestrator, done: int) -> int:
    """Adopt versions this run registered after its last saved tick (crash before the save).

    Returns the last finished tick: the tick of an adopted campaign is finished.
    """
    listing = getattr(orch.registry, "versions", None)
    if not callable(listing):
        return done
    try:
        versions = list(listing())
    except Exception as exc:  # noqa: BLE001 - the registry may be unreachable right now
        log.warning(
            "cannot list the registry to find versions registered after tick %d (%s); "
            "continuing from the saved state",
            done,
            " ".join(str(exc).split())[:200],
        )
        return done
    landed = sorted(
        (int(v["version"]), dict(v.get("tags", {})))
        for v in versions
        if dict(v.get("tags", {})).get(RUN_KEY_TAG) == orch.run_key
        and int(v["version"]) > orch.last_registered
    )
    adopted_ticks: set[int] = set()
    for version, tags in landed:
        tick = int(tags.get("fedge.trigger_tick", done))
        key = int(tags.get("fedge.cluster", 0)) if not orch.single else next(iter(orch.pool), 0)
        cluster = orch.pool.get(key)
        if cluster is None:
            devices = tuple(int(d) for d in tags.get("fedge.devices", "").split(",") if d)
            cluster = Cluster(key, dict(orch.initial_weights), 0, tick, tick, devices)
            orch.pool[key] = cluster
            for d in devices:
                orch.assignment[d] = key
        orch.last_registered = version
        if tick not in adopted_ticks:
            orch.rounds_done += int(tags.get("fedge.campaign_rounds", 0))
            adopted_ticks.add(tick)
        orch.model_rounds += int(tags.get("fedge.campaign_rounds", 0))
        cluster.last_campaign = tick
        if tags.get("fedge.promoted") == "true":
            orch.registry.set_alias(version, orch.alias(key))  # idempotent
            cluster.version = version
        done = max(done, tick)
        adopted: dict[str, int] = {"tick": tick, "version": version}
        if not orch.single:
            adopted["cluster"] = key
        orch.record.recovered.append(adopted)
        log.warning(
            "tick %d: campaign v%d was registered before the restart; adopted, not rerun",
            tick,
            version,
        )
    return done
