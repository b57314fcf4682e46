"""DP-SGD local training and privacy accounting (fedgen.training, fedgen.privacy.accounting).

Tiny MLPs on random tensors; every check compares against a computation that does not go
through the code under test (Opacus' RDP analysis called directly, per-example gradients by
a plain backward pass per example on a copy of the model).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import TensorDataset

from fedgen.config import RunConfig
from fedgen.data.site import SiteData
from fedgen.errors import FedgenError
from fedgen.privacy.accounting import (
    MAX_NOISE_MULTIPLIER,
    calibrate_noise_multiplier,
    check_delta,
    default_delta,
    epsilon_from_history,
    planned_steps,
    rdp_per_step,
)
from fedgen.privacy.per_example_grads import per_example_grads
from fedgen.privacy.plan import DIFFERENT_PEOPLE, SAME_PEOPLE, plan_privacy, site_account
from fedgen.training import train_local

OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _regression_data(n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    weights = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    y = x @ weights + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def squared_error(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).squeeze(1)


def _train(model, dataset, **options):
    defaults = dict(
        per_example_loss=squared_error,
        epochs=1,
        batch_size=10,
        lr=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-3,
        seed=0,
    )
    return train_local(model, dataset, **(defaults | options))


def _independent_epsilon(entries, delta):
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders) for sigma, q, steps in entries)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


def _grads_at_step(model, steps=(1,)):
    """A progress callback recording each parameter's .grad (and grad_sample) at the given steps."""
    seen = {}

    def progress(step, loss):
        if step in steps:
            seen[step] = {
                "grad": [p.grad.detach().clone() for p in model.parameters()],
                "grad_sample": [
                    p.grad_sample.detach().clone()
                    for p in model.parameters()
                    if getattr(p, "grad_sample", None) is not None
                ],
                "loss": loss,
            }

    return seen, progress


def _per_example_grads(model, example_losses):
    """Gradient of each example's loss, by one plain backward pass per example."""
    grads = []
    for loss in example_losses:
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(per_param) for per_param in zip(*grads)]


def _clipped_mean(per_example, max_grad_norm):
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example]).norm(dim=0)
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    n = len(norms)
    return [torch.einsum("i,i...->...", factor, g) / n for g in per_example]


# --- accounting -------------------------------------------------------------------------


def test_epsilon_composes_over_rounds_like_an_independent_rdp_computation():
    model, data = _mlp(), _regression_data(40)
    history, epsilons = (), []
    for _ in range(3):
        result = _train(model, data, epochs=2, noise_multiplier=1.1, history=history)
        history = result.history
        epsilons.append(result.epsilon)
    # 40 records, batch 10: q = 0.25, 4 steps an epoch, 2 epochs a round.
    assert history == ((1.1, 0.25, 8),) * 3
    for rounds, epsilon in enumerate(epsilons, start=1):
        expected = _independent_epsilon([(1.1, 0.25, 8 * rounds)], delta=1e-3)
        assert epsilon == pytest.approx(expected, rel=0.01)
    assert epsilons[0] < epsilons[1] < epsilons[2]


def _both_modalities_site(**settings) -> SiteData:
    """A site of 250 images and 100 notes (200 and 80 train), without files: plans need counts only."""
    return SiteData(
        root=Path("site-1"), name="site-1", image_classes=["a", "b"], text_classes=["a", "b"],
        image_paths=[Path(f"{i}.png") for i in range(250)], image_labels=[i % 2 for i in range(250)],
        texts=["note"] * 100, text_labels=[i % 2 for i in range(100)], heldout_fraction=0.2,
        epsilon_budget=None, **settings,
    )  # fmt: skip


def _both_modalities_config(**privacy) -> RunConfig:
    return RunConfig.model_validate({
        "modality": "both", "federation": {"rounds": 3},
        "image": {"batch_size": 20, "local_epochs": 2}, "text": {"batch_size": 10, "local_epochs": 1},
        "privacy": {"epsilon": 4.0, **privacy},
    })  # fmt: skip


def _planned_histories(config: RunConfig, site: SiteData) -> dict:
    rounds = config.federation.rounds
    return {m: [plan_privacy(config, site, modality=m).round_entry()] * rounds for m in config.modalities}


@pytest.mark.slow
def test_one_budget_covers_every_modality_trained_on_the_same_people():
    config, site = _both_modalities_config(), _both_modalities_site()
    histories = _planned_histories(config, site)
    account = site_account(config, site)
    assert account.composition == SAME_PEOPLE and account.delta == pytest.approx(0.1 / 200)
    everything = [entry for history in histories.values() for entry in history]
    composed = _independent_epsilon(everything, delta=account.delta)
    assert 0.98 * 4.0 <= composed <= 4.0 * 1.01  # the whole budget, once
    assert account.epsilon(histories) == pytest.approx(composed, rel=0.01)
    alone = {m: _independent_epsilon(h, delta=account.delta) for m, h in histories.items()}
    assert alone["image"] == pytest.approx(alone["text"], rel=0.05)  # split 0.5 / 0.5
    assert all(epsilon < 0.8 * 4.0 for epsilon in alone.values())


@pytest.mark.slow
def test_the_split_sets_each_modalitys_share():
    config, site = _both_modalities_config(split={"image": 0.75, "text": 0.25}), _both_modalities_site()
    histories = _planned_histories(config, site)
    delta = site_account(config, site).delta
    alone = {m: _independent_epsilon(h, delta=delta) for m, h in histories.items()}
    assert alone["image"] > 2 * alone["text"]
    assert _independent_epsilon([e for h in histories.values() for e in h], delta=delta) <= 4.0 * 1.01


def test_a_site_of_different_people_gives_each_modality_the_whole_budget():
    config, site = _both_modalities_config(), _both_modalities_site(different_people=True)
    histories = _planned_histories(config, site)
    account = site_account(config, site)
    assert account.composition == DIFFERENT_PEOPLE
    alone = {m: _independent_epsilon(h, delta=account.delta) for m, h in histories.items()}
    assert all(0.98 * 4.0 <= epsilon <= 4.0 * 1.01 for epsilon in alone.values())
    assert account.epsilon(histories) == pytest.approx(max(alone.values()), rel=0.01)


@pytest.mark.slow
def test_prv_epsilon_is_opacus_prv_and_needs_less_noise_than_rdp():
    history = [(1.2, 0.05, 40), (0.9, 0.1, 20), (1.2, 0.05, 40)]
    independent = PRVAccountant()
    independent.history = [(1.2, 0.05, 80), (0.9, 0.1, 20)]
    expected = independent.get_epsilon(delta=1e-5)
    assert epsilon_from_history(history, delta=1e-5, accountant="prv") == pytest.approx(expected, rel=0.01)
    assert expected < epsilon_from_history(history, delta=1e-5, accountant="rdp")
    target = dict(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=120)
    prv_sigma = calibrate_noise_multiplier(**target, accountant="prv")
    rdp_sigma = calibrate_noise_multiplier(**target, accountant="rdp")
    assert prv_sigma < rdp_sigma
    check = PRVAccountant()
    check.history = [(prv_sigma, 0.05, 120)]
    assert 0.99 * 3.0 <= check.get_epsilon(delta=1e-5) <= 3.0 * 1.01


@pytest.mark.parametrize("sample_rate", [1e-4, 0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.8, 1.7, 10.0, 60.0])
def test_rdp_of_one_step_is_opacus_compute_rdp_at_every_order(sigma, sample_rate):
    orders = RDPAccountant.DEFAULT_ALPHAS
    expected = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=orders)
    ours = rdp_per_step(sigma, sample_rate)
    assert np.array_equal(np.isinf(ours), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-13)


def test_calibrated_sigma_meets_the_target_over_the_planned_rounds():
    sample_rate, steps = planned_steps(n_records=200, batch_size=20, epochs_per_round=2, rounds=3)
    assert (sample_rate, steps) == (0.1, 60)
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-4, sample_rate=0.1, steps=60)
    planned_epsilon = _independent_epsilon([(sigma, 0.1, 60)], delta=1e-4)
    assert 0.99 * 2.0 <= planned_epsilon <= 2.0

    model, data, history = _mlp(), _regression_data(200), ()
    for _ in range(3):
        result = _train(
            model,
            data,
            epochs=2,
            batch_size=20,
            noise_multiplier=sigma,
            delta=1e-4,
            history=history,
        )
        history = result.history
    assert sum(steps for _, _, steps in history) == 60
    assert result.epsilon == pytest.approx(planned_epsilon, rel=1e-9)


def test_impossible_target_is_a_one_line_error():
    with pytest.raises(FedgenError) as error:
        calibrate_noise_multiplier(target_epsilon=0.001, delta=1e-5, sample_rate=0.1, steps=120)
    assert str(error.value) == (
        f"target ε=0.001 at δ=1e-05 needs σ > {MAX_NOISE_MULTIPLIER:g} for 120 steps at q=0.1; "
        "raise ε or reduce rounds/epochs"
    )


def test_planned_steps_follow_opacus_sampling():
    assert planned_steps(n_records=100, batch_size=30, epochs_per_round=2, rounds=3) == (0.25, 24)
    assert planned_steps(n_records=5, batch_size=64, epochs_per_round=1, rounds=2) == (1.0, 2)
    # float rounding makes Opacus' sampler draw one batch fewer than 1/q for q = 1/93
    sampler = UniformWithReplacementSampler(num_samples=93, sample_rate=1 / 93)
    assert planned_steps(n_records=93, batch_size=1, epochs_per_round=1, rounds=1) == (
        1 / 93,
        len(sampler),
    )


def test_delta_default_and_check():
    assert default_delta(500) == pytest.approx(2e-4)
    check_delta(1e-3, 200)
    with pytest.raises(FedgenError, match=r"^δ=0.01 must be below 1/records = 0.005 for site-2$"):
        check_delta(0.01, 200, site="site-2")
    with pytest.raises(FedgenError, match="must be below 1/records"):
        _train(_mlp(), _regression_data(40), delta=1 / 40)


def test_epsilon_of_a_round_without_noise_is_infinite():
    assert epsilon_from_history([], delta=1e-5) == 0.0
    assert math.isfinite(epsilon_from_history([(1.0, 0.1, 10)], delta=1e-5))
    assert epsilon_from_history([(1.0, 0.1, 10), (0.0, 0.1, 5)], delta=1e-5) == math.inf


# --- training ---------------------------------------------------------------------------


def _full_loss(model, data):
    with torch.no_grad():
        return squared_error(model, data.tensors).mean().item()


def test_non_private_training_lowers_the_loss_and_spends_infinite_epsilon():
    model, data = _mlp(), _regression_data(64)
    before = _full_loss(model, data)
    result = _train(model, data, noise_multiplier=None, epochs=20, batch_size=16, lr=3e-2)
    assert _full_loss(model, data) < 0.5 * before
    assert result.epsilon == math.inf
    assert result.history == ((0.0, 0.25, 80),)
    assert (result.steps, result.num_examples) == (80, 64)


def test_model_stays_a_plain_module_and_trains_again():
    model, data = _mlp(), _regression_data(40)
    keys = list(model.state_dict())
    for mode in ("hooks", "ghost"):
        before = copy.deepcopy(model.state_dict())
        _train(model, data, grad_sample_mode=mode, max_physical_batch_size=4)
        assert list(model.state_dict()) == keys
        assert not any(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not [a for p in model.parameters() for a in OPACUS_PARAM_ATTRS if hasattr(p, a)]
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
        assert not any(hasattr(m, "activations") for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_only_trainable_parameters_change():
    model, data = _mlp(), _regression_data(40)
    for p in model[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    trainable = [p.detach().clone() for p in model[2].parameters()]
    _train(model, data, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(trainable, model[2].parameters()))


def test_clipping_bounds_each_examples_contribution():
    data = _regression_data(8)
    model = _mlp()
    initial = copy.deepcopy(model)
    seen, progress = _grads_at_step(model)
    # batch_size >= n: q = 1, one step over all 8 examples; σ = 0 leaves the clipped mean.
    _train(model, data, batch_size=8, noise_multiplier=0.0, max_grad_norm=0.01, progress=progress)
    per_example = _per_example_grads(initial, squared_error(initial, data.tensors))
    expected = _clipped_mean(per_example, max_grad_norm=0.01)
    for got, want in zip(seen[1]["grad"], expected):
        torch.testing.assert_close(got, want)
    total_norm = torch.stack([g.norm() for g in seen[1]["grad"]]).norm()
    unclipped_norm = torch.stack([g.mean(0).norm() for g in per_example]).norm()
    assert total_norm <= 0.01 < unclipped_norm


def test_per_example_hooks_leave_each_rows_own_gradient_of_the_summed_loss():
    model, reference, data = _mlp(), _mlp(), _regression_data(5)
    expected = _per_example_grads(reference, squared_error(reference, data.tensors))
    with per_example_grads(model):
        squared_error(model, data.tensors).sum().backward()
        with torch.no_grad():  # an evaluation forward inside the context adds nothing
            model(data.tensors[0])
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad_sample, want)
    assert not any(m._forward_hooks for m in model.modules())


def test_per_example_hooks_refuse_what_they_cannot_attribute():
    shared = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    with per_example_grads(shared):  # two backward passes before a step
        shared(x).sum().backward()
        with pytest.raises(FedgenError, match="Linear got a second per-example gradient"):
            shared(x).sum().backward()
    twice = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    twice[2] = twice[0]  # one module used twice in a forward
    with per_example_grads(twice), pytest.raises(FedgenError, match="second per-example"):
        twice(x).sum().backward()

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = nn.Parameter(torch.ones(1))

    unsupported = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(FedgenError, match="no per-example gradient sampler for Scale"):
        with per_example_grads(unsupported):
            pass
    assert not any(m._forward_hooks for m in unsupported.modules())
    with pytest.raises(FedgenError, match="BatchNorm1d has trainable parameters and buffers"):
        with per_example_grads(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))):
            pass


def test_ghost_clipping_gives_the_same_update_as_hooks():
    data = _regression_data(8)
    grads, params = {}, {}
    for mode in ("hooks", "ghost"):
        model = _mlp()
        seen, progress = _grads_at_step(model)
        _train(
            model,
            data,
            batch_size=8,
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            grad_sample_mode=mode,
            progress=progress,
        )
        grads[mode], params[mode] = seen[1]["grad"], list(model.parameters())
    for hooks_grad, ghost_grad in zip(grads["hooks"], grads["ghost"]):
        torch.testing.assert_close(ghost_grad, hooks_grad)
    for hooks_param, ghost_param in zip(params["hooks"], params["ghost"]):
        torch.testing.assert_close(ghost_param, hooks_param)
    with pytest.raises(FedgenError, match="noise_multiplicity=2 needs grad_sample_mode 'hooks'"):
        _train(_mlp(), data, grad_sample_mode="ghost", noise_multiplicity=2)


DRAWS_SEED = 123


def noisy_squared_error(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A loss with one random draw per row (like a diffusion timestep), reproducible by row."""
    x, y = batch
    draws = torch.randn(len(x), 1, generator=torch.Generator().manual_seed(DRAWS_SEED))
    return ((model(x) + draws - y) ** 2).squeeze(1)


def test_noise_multiplicity_averages_the_draws_of_each_example_before_clipping():
    n, k = 6, 3
    data = _regression_data(n)
    model = _mlp()
    initial = copy.deepcopy(model)
    seen, progress = _grads_at_step(model)
    _train(
        model,
        data,
        per_example_loss=noisy_squared_error,
        batch_size=n,
        noise_multiplier=0.0,
        max_grad_norm=0.01,
        noise_multiplicity=k,
        progress=progress,
    )
    x, y = data.tensors
    rows = noisy_squared_error(initial, (x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)))
    per_example = _per_example_grads(initial, rows.view(n, k).mean(dim=1))
    for got, want in zip(seen[1]["grad_sample"], per_example):
        torch.testing.assert_close(got, want)
    for got, want in zip(seen[1]["grad"], _clipped_mean(per_example, max_grad_norm=0.01)):
        torch.testing.assert_close(got, want)

    data = _regression_data(40)
    with_draws = _train(_mlp(), data, noise_multiplicity=k, per_example_loss=noisy_squared_error)
    without = _train(_mlp(), data)
    assert with_draws.history == without.history == ((1.0, 0.25, 4),)
    assert (
        with_draws.epsilon
        == without.epsilon
        == pytest.approx(_independent_epsilon([(1.0, 0.25, 4)], delta=1e-3), rel=1e-9)
    )


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_physical_batches_give_the_logical_batch_update(grad_sample_mode):
    data = _regression_data(10)
    grads, step_lists = {}, {}
    for physical in (None, 3):
        model = _mlp()
        seen, progress = _grads_at_step(model, steps=(1, 2))
        steps = []
        _train(
            model,
            data,
            epochs=2,
            batch_size=10,
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            max_physical_batch_size=physical,
            grad_sample_mode=grad_sample_mode,
            progress=lambda step, loss: (steps.append(step), progress(step, loss)),
        )
        grads[physical], step_lists[physical] = seen, steps
    assert step_lists[None] == step_lists[3] == [1, 2]
    for step in (1, 2):
        for whole, split in zip(grads[None][step]["grad"], grads[3][step]["grad"]):
            torch.testing.assert_close(split, whole)
        assert grads[3][step]["loss"] == pytest.approx(grads[None][step]["loss"])


def test_empty_poisson_batches_are_noise_only_steps():
    model, data = _mlp(), _regression_data(30)
    empty_step_grad_norms = []

    def progress(step, loss):
        if math.isnan(loss):
            grad_norms = torch.stack([p.grad.norm() for p in model.parameters()])
            empty_step_grad_norms.append(grad_norms.norm())

    result = _train(model, data, batch_size=1, progress=progress)
    assert result.history == ((1.0, 1 / 30, 30),)
    assert empty_step_grad_norms, "expected some empty batches at q = 1/30"
    assert all(norm > 0 for norm in empty_step_grad_norms)


def test_a_seed_makes_sampling_and_noise_reproducible():
    data = _regression_data(40)
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        model = _mlp()
        _train(model, data, epochs=2, seed=seed)
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.allclose(runs["a"], runs["c"])


def test_fedprox_pull_keeps_weights_nearer_the_round_start():
    """The proximal term shrinks the drift from the round's starting weights, DP or not."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))

    def loss(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(dim=1)

    drifts = {}
    for mu in (0.0, 5.0):
        torch.manual_seed(1)
        model = torch.nn.Linear(4, 1)
        start = [p.detach().clone() for p in model.parameters()]
        result = train_local(
            model,
            data,
            loss,
            epochs=3,
            batch_size=16,
            lr=0.05,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            delta=1e-5,
            seed=0,
            proximal_mu=mu,
        )
        drifts[mu] = sum(float((p - p0).norm()) for p, p0 in zip(model.parameters(), start))
        eps = result.epsilon
    assert drifts[5.0] < 0.8 * drifts[0.0]
    assert eps == pytest.approx(epsilon_from_history([(1.0, result.sample_rate, result.steps)], delta=1e-5))


def test_noise_source_is_stated_not_warned_and_secure_mode_needs_torchcsprng():
    import importlib.util
    import warnings

    from fedgen.privacy.dp_sgd import noise_source

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(_mlp(), _regression_data(20))
    assert not [w for w in caught if "Secure RNG" in str(w.message)]
    assert "NOT a cryptographically secure generator" in noise_source(False)
    assert importlib.util.find_spec("torchcsprng") is None  # the installed stack: no secure mode
    with pytest.raises(FedgenError, match=r"privacy.secure_mode needs torchcsprng, which is not installed"):
        _train(_mlp(), _regression_data(20), secure_mode=True)
