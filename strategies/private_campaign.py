"""A run's ``[privacy]`` settings applied to each campaign, with the account they keep.

:class:`PrivateCampaigns` is what the ServerApp asks, campaign by campaign:

- :meth:`~PrivateCampaigns.admit`: may this campaign start? It refuses, in one
  line, a campaign the privacy budget cannot pay for (and charges the ones it
  admits, before any noised update is released), or a secure campaign with
  fewer devices than the protocol needs.
- :meth:`~PrivateCampaigns.apply`: the campaign's strategy wrapped for central
  DP (Flower's fixed-clipping wrappers) and its grid wrapped for secure
  aggregation (:class:`strategies.secagg.SecAggGrid`).
- :meth:`~PrivateCampaigns.evidence`: the tags every registered model version
  carries (``fedge.aggregation``, ``fedge.dp``, ``fedge.epsilon``, ...) and the
  epsilon metrics logged with the run.

The device side is :func:`clients.secagg.privacy_mods`; the local DP
parameters both sides agree on come from :func:`local_dp_params`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.contracts.config import MIN_SECURE_DEVICES, FedgeConfig, PrivacyConfig
from fedge.core.ports import CampaignRefused
from fedge.core.state import JsonState
from fedge.engines.quorum import ReplyQuorum
from fedge.privacy.accounting import PrivacyBudget, Spend, local_dp_params
from fedge.privacy.secagg_settings import SecAggRoundReport, secagg_config
from strategies.dp import wrap_strategy_for_dp
from strategies.secagg import SecAggGrid

log = logging.getLogger("fedge.privacy")


CENTRAL = ("central-server", "central-client")


class _OneSecureReply(logging.Filter):
    """Drops Flower's DP-wrapper warning about the reply count under secure aggregation.

    The wrapper warns when fewer replies come back than devices were sampled;
    a ``SecAggGrid`` always returns one reply (the unmasked sum) for all of
    them. The noise is calibrated to ``num_sampled_clients`` given at
    construction, so the warning does not apply.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "differs from the number of sampled clients" not in record.getMessage()


_FLWR_FILTER = _OneSecureReply()


def equal_weights(privacy: PrivacyConfig) -> bool:
    """True when campaigns average the devices' updates unweighted (central DP)."""
    return privacy.dp in CENTRAL


@dataclass
class Evidence:
    """What a campaign ran under, for its model version and the run's metrics."""

    tags: dict[str, str]
    metrics: dict[str, float]


class PrivateCampaigns:
    """The privacy side of every campaign in one run (one model lineage).

    Parameters
    ----------
    cfg : FedgeConfig
        The run configuration; only ``privacy`` and ``monitor.window`` are read.
    """

    def __init__(self, cfg: FedgeConfig, ledger: Path | None = None) -> None:
        self.cfg = cfg.privacy
        self.reply_timeout = cfg.run.reply_timeout
        self.ledger = JsonState(ledger) if ledger is not None else None
        self.secure = cfg.privacy.secure_aggregation
        self.dp = cfg.privacy.dp
        self.local = local_dp_params(cfg.privacy)
        self.secagg = (
            secagg_config(
                cfg.privacy, equal_weights=equal_weights(cfg.privacy), max_weight=cfg.monitor.window
            )
            if self.secure
            else None
        )
        self.budget: PrivacyBudget | None = None
        if self.dp != "none":
            self.budget = PrivacyBudget(
                epsilon_limit=cfg.privacy.epsilon_budget,
                delta=cfg.privacy.delta,
                noise_multiplier=self.noise_multiplier,
            )
        self._spend: Spend | None = None

    @property
    def active(self) -> bool:
        """True when campaigns run under secure aggregation or DP."""
        return self.secure or self.dp != "none"

    @property
    def noise_multiplier(self) -> float:
        """The ``z`` the accountant charges per round (noise std / sensitivity)."""
        if self.local is not None:
            return self.local.noise_std / self.local.sensitivity
        return self.cfg.noise_multiplier

    # -- before a campaign -----------------------------------------------------------------

    def admit(self, rounds: int, n_devices: int, label: str) -> None:
        """Charge a campaign of ``rounds`` rounds over ``n_devices`` devices, or refuse it.

        Raises
        ------
        CampaignRefused
            One line saying why; nothing is charged.
        """
        self._spend = None
        if self.secure and n_devices < MIN_SECURE_DEVICES:
            raise CampaignRefused(
                f"secure aggregation needs at least {MIN_SECURE_DEVICES} devices in a campaign, "
                f"{n_devices} would take part"
            )
        if self.budget is None:
            return
        reason = self.budget.refusal(rounds)
        if reason is not None:
            raise CampaignRefused(f"{reason}; no further campaign will start")
        self._spend = self.budget.charge(rounds, label=label)
        if self.ledger is not None:
            # Written before any noised update is released: an abandoned or
            # crashed campaign stays charged across restarts.
            self.ledger.save({"spends": [vars(s) for s in self.budget.spends]})

    def apply(self, strategy: Strategy, grid: Grid, nodes: Sequence[int]) -> tuple[Strategy, Grid]:
        """The campaign's strategy and grid with central DP and secure aggregation on."""
        if self.dp in CENTRAL:
            # The noise is calibrated for every device of the campaign: a round
            # short of any of them abandons the campaign.
            grid = ReplyQuorum(grid, len(nodes), self.reply_timeout)
            strategy = wrap_strategy_for_dp(
                strategy,
                self.cfg.noise_multiplier,
                self.cfg.clipping_norm,
                len(nodes),
                clipping="server" if self.dp == "central-server" else "client",
                secure_aggregation=self.secure,
            )
        if self.secagg is not None:
            grid = SecAggGrid(grid, nodes, self.secagg)
            if self.dp in CENTRAL:
                logging.getLogger("flwr").addFilter(_FLWR_FILTER)
        return strategy, grid

    # -- after a campaign ------------------------------------------------------------------

    def check_complete(self, grid: Grid) -> None:
        """Refuse a central-DP campaign whose secure rounds lost devices.

        Raises
        ------
        CampaignRefused
            The aggregate holds fewer updates than the noise was calibrated for.
        """
        if self.dp in CENTRAL and isinstance(grid, SecAggGrid) and _dropped(grid.reports):
            raise CampaignRefused(
                f"campaign abandoned: {_dropped(grid.reports)} devices dropped out of secure "
                "aggregation and the central DP noise was calibrated for all of them; "
                "nothing registered"
            )

    def evidence(self, grid: Grid) -> Evidence:
        """Tags for the campaign's model version and metrics for the run."""
        tags = {"fedge.aggregation": self.aggregation_label(grid), "fedge.dp": self.dp_label()}
        metrics: dict[str, float] = {}
        if isinstance(grid, SecAggGrid) and grid.reports:
            tags["fedge.secagg_dropped"] = str(_dropped(grid.reports))
        if self.budget is not None and self._spend is not None:
            spent = self.budget.spent
            tags.update(
                {
                    "fedge.epsilon": f"{spent:.4f}",
                    "fedge.epsilon_campaign": f"{self._spend.epsilon:.4f}",
                    "fedge.delta": f"{self.budget.delta:g}",
                    "fedge.epsilon_budget": f"{self.budget.epsilon_limit:g}",
                    "fedge.dp_rounds": str(self._spend.rounds),
                    "fedge.dp_noise_multiplier": repr(self._spend.noise_multiplier),
                }
            )
            metrics = {
                "privacy/epsilon_spent": spent,
                "privacy/epsilon_campaign": self._spend.epsilon,
                "privacy/epsilon_remaining": self.budget.remaining,
            }
        return Evidence(tags, metrics)

    def aggregation_label(self, grid: Grid | None = None) -> str:
        """``plaintext`` or the SecAgg+ settings of the last round."""
        if self.secagg is None:
            return "plaintext"
        if isinstance(grid, SecAggGrid) and grid.reports:
            last = grid.reports[-1]
            return f"secagg+ (k={last.num_shares} of {last.devices}, t={last.threshold})"
        return f"secagg+ (shares={self.cfg.secagg_shares:g}, threshold={self.cfg.secagg_threshold:g})"

    def dp_label(self) -> str:
        """The DP mode and its parameters, for people."""
        if self.dp == "none":
            return "none"
        if self.local is not None:
            return (
                f"local (LocalDpMod, C={self.local.clipping_norm:g}, "
                f"noise std {self.local.noise_std:.3g})"
            )
        return f"{self.dp} (z={self.cfg.noise_multiplier:g}, C={self.cfg.clipping_norm:g})"

    # -- across runs -----------------------------------------------------------------------

    def restore(self, versions: Iterable[Mapping[str, Any]]) -> int:
        """Charge the budget again with the lineage's earlier DP campaigns.

        From the ledger file when there is one (every admitted campaign), else
        from the tags of earlier model versions. A restarted server so keeps
        the lineage's account. Returns how many campaigns were replayed.
        """
        if self.budget is None:
            return 0
        saved = self.ledger.load() if self.ledger is not None else None
        if saved and isinstance(saved.get("spends"), list):
            # The ledger holds every admitted campaign, also those that registered nothing.
            for spend in saved["spends"]:
                try:
                    rounds, z = int(spend["rounds"]), float(spend["noise_multiplier"])
                    q, label = float(spend.get("sampling_rate", 1.0)), str(spend.get("label", ""))
                except (KeyError, TypeError, ValueError):
                    log.warning("privacy ledger %s: unreadable entry %r, not replayed", self.ledger, spend)
                    continue
                self.budget.charge(rounds, z, q, label=label, enforce=False)
            return self._replayed(len(self.budget.spends))
        replayed = 0
        for version in sorted(versions, key=lambda v: int(v.get("version", 0))):
            tags = version.get("tags", {})
            if "fedge.dp_rounds" not in tags:
                continue
            try:
                rounds = int(tags["fedge.dp_rounds"])
                z = float(tags["fedge.dp_noise_multiplier"])
            except (KeyError, ValueError):
                log.warning("version %s: unreadable DP tags, not replayed", version.get("version"))
                continue
            self.budget.charge(rounds, z, label=f"v{version.get('version')}", enforce=False)
            replayed += 1
        return self._replayed(replayed)

    def _replayed(self, replayed: int) -> int:
        assert self.budget is not None
        if replayed:
            log.info(
                "privacy budget: %d earlier campaigns replayed, epsilon %.3f of %g spent",
                replayed,
                self.budget.spent,
                self.budget.epsilon_limit,
            )
        return replayed


def _dropped(reports: Sequence[SecAggRoundReport]) -> int:
    lost: set[int] = set()
    for report in reports:
        for nodes in report.dropped.values():
            lost.update(nodes)
    return len(lost)
