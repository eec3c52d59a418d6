"""DP accounting and Flower's DP wrappers and mods, as a compliance owner would check them."""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import FedAvg, Strategy

from clients.secagg import privacy_mods, register_secagg_actions
from fedge.engines.inprocess import InProcessGrid
from fedge.privacy.accounting import (
    DEFAULT_ORDERS,
    LocalDpParams,
    PrivacyBudget,
    PrivacyBudgetExceeded,
    campaign_epsilon,
    effective_noise_multiplier,
    gaussian_delta,
    gaussian_rdp,
    rdp_to_epsilon,
)
from fedge.privacy.secagg_settings import SecAggConfig
from strategies.dp import wrap_strategy_for_dp
from strategies.secagg import secure_strategy_grid

DELTA = 1e-5
INTEGER_ORDERS = [a for a in DEFAULT_ORDERS if float(a).is_integer()]

# Reference epsilons from Google's dp_accounting 0.6.0 (RdpAccountant, default orders,
# GaussianDpEvent / PoissonSampledDpEvent composed `rounds` times, get_epsilon(1e-5)).
NO_SAMPLING_REFERENCE = [
    # rounds, noise multiplier, epsilon
    (5, 1.0, 12.301691480042894),
    (20, 1.0, 30.12663110385034),
    (10, 2.0, 8.079406222420491),
]
# Same library, same events, restricted to integer orders (what fedge evaluates for q < 1),
# and with its default orders (which add fractional ones and give a slightly lower epsilon).
SAMPLED_REFERENCE = [
    # rounds, z, q, epsilon (integer orders), epsilon (default orders)
    (100, 1.1, 0.1, 6.745046581290989, 6.62076948219146),
    (1000, 1.0, 0.01, 2.1077530754515745, 2.101366525420273),
]


@pytest.mark.parametrize(("rounds", "z", "want"), NO_SAMPLING_REFERENCE)
def test_campaign_epsilon_matches_the_reference_accountant(
    rounds: int, z: float, want: float
) -> None:
    assert campaign_epsilon(rounds, z, 1.0, DELTA) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    ("rounds", "z", "q", "integer_orders", "default_orders"), SAMPLED_REFERENCE
)
def test_subsampled_epsilon_matches_the_reference_and_stays_on_the_safe_side(
    rounds: int, z: float, q: float, integer_orders: float, default_orders: float
) -> None:
    rdp = rounds * gaussian_rdp(z, q, INTEGER_ORDERS)
    assert rdp_to_epsilon(rdp, DELTA, INTEGER_ORDERS)[0] == pytest.approx(integer_orders, rel=1e-9)
    eps = campaign_epsilon(rounds, z, q, DELTA)
    assert default_orders <= eps <= default_orders * 1.03


def test_one_release_without_sampling_is_the_closed_form_bound() -> None:
    # By hand: RDP a / (2 z^2) at order a; at z = 1, a = 6: 3 + log(5/6) - log(6e-5) / 5.
    rdp = gaussian_rdp(1.0, 1.0, [6.0])
    assert rdp[0] == 3.0
    assert rdp_to_epsilon(rdp, DELTA, [6.0])[0] == pytest.approx(
        3 + math.log(5 / 6) - math.log(6e-5) / 5
    )


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling() -> None:
    by_rounds = [campaign_epsilon(r, 1.0) for r in (1, 2, 5, 10, 50)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 5
    by_noise = [campaign_epsilon(10, z) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert (
        campaign_epsilon(10, 1.0, 0.1) < campaign_epsilon(10, 1.0, 0.5) < campaign_epsilon(10, 1.0)
    )
    assert campaign_epsilon(0, 1.0) == 0.0


def test_the_budget_composes_campaigns_and_refuses_the_one_that_would_exceed_it() -> None:
    budget = PrivacyBudget(epsilon_limit=10.0, delta=DELTA, noise_multiplier=2.0)
    first = budget.charge(5, label="tick 3")
    assert first.epsilon == pytest.approx(budget.cost(5))
    budget.charge(5, label="tick 9")
    # RDP composition: two 5-round campaigns cost exactly one 10-round campaign, less than
    # adding their epsilons.
    assert budget.spent == pytest.approx(campaign_epsilon(10, 2.0))
    assert budget.spent < 2 * first.epsilon
    assert budget.remaining == pytest.approx(10.0 - budget.spent)
    assert budget.can_afford(1)
    assert not budget.can_afford(10)
    reason = budget.refusal(10)
    assert reason is not None and "\n" not in reason
    assert "10-round campaign" in reason and "of 10" in reason
    spent = budget.spent
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget: a 10-round campaign"):
        budget.charge(10)
    assert budget.spent == spent and len(budget.spends) == 2
    affordable = budget.affordable_rounds()
    assert budget.can_afford(affordable) and not budget.can_afford(affordable + 1)
    assert budget.summary()["campaigns"][1]["label"] == "tick 9"


def test_bad_budget_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="delta"):
        PrivacyBudget(epsilon_limit=1.0, delta=1.5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyBudget(epsilon_limit=1.0, delta=DELTA).cost(3)


def test_weighting_by_examples_weakens_the_noise_the_wrapper_adds() -> None:
    assert effective_noise_multiplier(1.0, [50, 50, 50]) == 1.0
    assert effective_noise_multiplier(1.0, [10, 10, 100]) == pytest.approx(0.4)


def test_local_dp_epsilon_is_what_the_mods_noise_really_buys() -> None:
    params = LocalDpParams(clipping_norm=1.0, sensitivity=1.0, epsilon=1.0, delta=DELTA)
    assert params.noise_std == pytest.approx(math.sqrt(2 * math.log(1.25 / DELTA)))
    # Calibrated to the declared sensitivity, the classic formula is conservative...
    declared = params.epsilon_per_release(sensitivity=1.0)
    assert declared < 1.0
    assert gaussian_delta(declared, 1.0, params.noise_std) == pytest.approx(DELTA, rel=1e-6)
    # ...but two clipped updates can differ by twice the clipping norm.
    assert params.epsilon_per_release() > 1.0
    assert params.epsilon_after(10) > 3 * params.epsilon_per_release()


SIZE = 4000


def dp_app(update: float, mods: list[Mod] | None = None) -> ClientApp:
    """Every device adds ``update`` (times its partition id + 1) to each weight."""
    app = ClientApp(mods=mods or [])
    register_secagg_actions(app)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = msg.content.array_records["arrays"]
        arrays = ArrayRecord({k: Array(start[k].numpy() + update * (pid + 1)) for k in start})
        metrics = MetricRecord({"num-examples": 10, "train_loss": 0.1})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def zeros() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def run_round(app: ClientApp, strategy: Strategy, n: int, secure: bool = False) -> np.ndarray:
    grid = InProcessGrid(app, n, {})
    result = strategy.start(
        grid=secure_strategy_grid(grid, config=SecAggConfig(max_weight=100)) if secure else grid,
        initial_arrays=zeros(),
        num_rounds=1,
    )
    return cast(ArrayRecord, result.arrays)["w"].numpy().astype(np.float64)


def fedavg(n: int) -> FedAvg:
    return FedAvg(min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0)


def test_central_dp_around_fedavg_clips_each_update_and_adds_the_configured_noise() -> None:
    n, clip = 4, 1.0
    # Device i's update has norm (i + 1) * sqrt(SIZE) * 0.05 = 3.2 (i + 1): every one is clipped.
    clipped_avg = clip / math.sqrt(SIZE)
    exact = run_round(dp_app(0.05), wrap_strategy_for_dp(fedavg(n), 0.0, clip, n), n)
    np.testing.assert_allclose(exact, clipped_avg, rtol=1e-5)
    assert np.linalg.norm(exact) == pytest.approx(clip, rel=1e-5)

    z = 2.0
    noisy = run_round(dp_app(0.05), wrap_strategy_for_dp(fedavg(n), z, clip, n), n)
    noise = noisy - clipped_avg
    assert np.std(noise) == pytest.approx(z * clip / n, rel=0.1)
    assert abs(np.mean(noise)) < 0.1 * z * clip / n


def test_client_side_clipping_runs_under_secure_aggregation() -> None:
    n, clip = 4, 1.0
    strategy = wrap_strategy_for_dp(
        fedavg(n), 0.0, clip, n, clipping="client", secure_aggregation=True
    )
    got = run_round(dp_app(0.05, privacy_mods()), strategy, n, secure=True)
    np.testing.assert_allclose(got, clip / math.sqrt(SIZE), atol=1e-4)
    with pytest.raises(ValueError, match="under secure aggregation use 'client'"):
        wrap_strategy_for_dp(fedavg(n), 1.0, clip, n, secure_aggregation=True)


def test_local_dp_mod_noises_each_update_with_the_accounted_std() -> None:
    n = 3
    params = LocalDpParams(clipping_norm=10.0, sensitivity=0.01, epsilon=1.0, delta=DELTA)
    got = run_round(dp_app(0.001, privacy_mods(local_dp=params)), fedavg(n), n)
    # The average of n independent noises has std noise_std / sqrt(n).
    noise = got - 0.001 * (1 + 2 + 3) / n
    assert np.std(noise) == pytest.approx(params.noise_std / math.sqrt(n), rel=0.1)
    # A device without local DP for this run sends its update untouched.
    plain = run_round(dp_app(0.001, privacy_mods(local_dp=lambda ctx: None)), fedavg(n), n)
    np.testing.assert_allclose(plain, 0.002, rtol=1e-5)
