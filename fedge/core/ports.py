"""The ports the loop talks through: devices, registry, tracker, saved state.

Flower, MLflow and a JSON file sit behind them in production; tests put plain
Python objects there. Nothing here imports Flower, MLflow or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedge.contracts.protocol import DriftReport

Weights = dict[str, np.ndarray]
#: Device -> cluster -> fraction of the device's latest samples the cluster's model gets right.
Scores = dict[int, dict[int, float]]


class CampaignRefused(RuntimeError):
    """A federation declines to start a campaign (e.g. the privacy budget is spent).

    The message is one line saying why; the orchestrator records it, registers
    nothing and keeps monitoring.
    """


class RunFailed(RuntimeError):
    """The run cannot do its work (e.g. every device failed); the message is one line saying why.

    A run that ends this way is never reported as finished.
    """


@dataclass(frozen=True)
class RoundMetrics:
    """Aggregated metrics of one strategy round."""

    round: int
    train_loss: float
    eval_acc: float
    eval_loss: float
    champion_acc: float
    n_devices: int
    #: Fraction of held-out samples exactly one of candidate and champion got right (NaN: not reported).
    discordant: float = float("nan")


@dataclass(frozen=True)
class CampaignOutcome:
    """What a federation returns after a campaign's strategy rounds."""

    weights: Weights
    rounds: tuple[RoundMetrics, ...]
    n_devices: int
    #: Extra lineage tags for the model version (e.g. aggregation and DP settings).
    tags: Mapping[str, str] = field(default_factory=dict)
    #: Extra run metrics logged at the campaign's tick (e.g. epsilon spent).
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: Devices left out for holding fewer than ``campaign.min_labels`` labelled samples.
    too_few_labels: tuple[int, ...] = ()
    #: Labelled holdout samples the last evaluation rested on (-1: not known).
    gate_labels: int = -1

    @property
    def candidate_acc(self) -> float:
        """Federated accuracy of the final global model on the devices' holdout."""
        return self.rounds[-1].eval_acc if self.rounds else float("nan")

    @property
    def champion_acc(self) -> float:
        """Federated accuracy of the deployed model on the same holdout."""
        return self.rounds[-1].champion_acc if self.rounds else float("nan")

    @property
    def discordant(self) -> float:
        """Fraction of the holdout exactly one of candidate and champion got right (NaN: unknown)."""
        return self.rounds[-1].discordant if self.rounds else float("nan")


@dataclass(frozen=True)
class Deployed:
    """The model a device should run: its cluster, the registry version and the weights."""

    cluster: int
    version: int
    weights: Weights


class Federation(Protocol):
    """The devices, as the orchestrator sees them.

    Optional methods a federation may add, looked up by name: ``late_reports()``
    (reports of earlier ticks that arrived with the last poll), ``checkpoint()``
    and ``restore(state)`` (what a restarted server needs), ``score_counts(tick,
    models)`` (per device, the samples scored and each model's correct count:
    the champion on standby is judged on it, :mod:`fedge.core.standby`).
    """

    def poll(
        self, tick: int, deployment: Mapping[int, Deployed], default: Deployed | None
    ) -> list[DriftReport]:
        """Monitoring tick: deploy each device its model where stale, collect drift reports.

        ``deployment`` maps known devices to their model; ``default`` serves a
        device not in it (a device seen for the first time), or None.
        """
        ...

    def score(self, tick: int, models: Mapping[int, Weights]) -> Scores:
        """Fraction of each device's latest samples each model gets right."""
        ...

    def campaign(
        self,
        devices: Sequence[int],
        start: Weights,
        *,
        tick: int,
        rounds: int,
        first_round: int,
        lineage: str,
    ) -> CampaignOutcome:
        """Run ``rounds`` strategy rounds over ``devices`` starting from ``start``.

        ``lineage`` names the model line the campaign trains (its registry
        alias): privacy budgets are kept per lineage.
        """
        ...


class Registry(Protocol):
    """Model versions and their aliases."""

    def register(self, weights: Weights, tags: Mapping[str, str]) -> int:
        """Register a model version, return its number."""
        ...

    def set_alias(self, version: int, alias: str) -> None:
        """Point ``alias`` at ``version`` (idempotent)."""
        ...

    def load(self, alias: str) -> tuple[int, Weights] | None:
        """The version holding ``alias`` and its weights, if any."""
        ...

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version with its tags (a resumed run looks for its own)."""
        ...


class Tracker(Protocol):
    """Metrics and events of the run."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step``."""
        ...

    def log_event(self, kind: str, tick: int, payload: Mapping[str, Any]) -> None:
        """Record an event with its evidence."""
        ...


class StateStore(Protocol):
    """Where the orchestrator keeps its counters between restarts (e.g. a JSON file)."""

    def load(self) -> Mapping[str, Any] | None:
        """The saved state, or None when there is none."""
        ...

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the saved state at once (a crash leaves the old or the new one)."""
        ...
