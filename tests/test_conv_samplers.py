"""Conv2d samplers (fedgen.privacy.conv_samplers) and the UNet trained with them.

References never go through the code under test: per-example gradients come from one
autograd backward per example, ε from Opacus' RDP analysis called directly.
"""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from torch import nn
from torch.utils.data import TensorDataset

from fedgen.config import ImageConfig
from fedgen.models.diffusion import build_unet, denoising_loss, make_noise_scheduler
from fedgen.privacy import conv_samplers
from fedgen.privacy.conv_samplers import (
    compute_conv2d_grad_sample,
    compute_conv2d_norm_sample,
    conv2d_weight_norms,
    prefers_ghost_norm,
    without_summed_conv_grads,
)
from fedgen.training import train_local

BATCH = 5
CONV_SHAPES = {
    "3x3 padded": {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1},
    "strided, grouped, no bias": {
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": 3,
        "stride": 2,
        "padding": 1,
        "groups": 2,
        "bias": False,
    },
    "dilated, 'same', reflect": {
        "in_channels": 6,
        "out_channels": 6,
        "kernel_size": (3, 2),
        "dilation": 2,
        "padding": "same",
        "groups": 3,
        "padding_mode": "reflect",
    },
    "1x1 shortcut, unpadded": {"in_channels": 5, "out_channels": 3, "kernel_size": 1},
    "'same', zeros": {"in_channels": 4, "out_channels": 4, "kernel_size": 3, "padding": "same"},
}
# Tiny UNet at 8x8: its convs run at 64 positions (direct) and 16 (ghost norm).
TINY_UNET = ImageConfig(resolution=8, block_out_channels=[8, 16], norm_num_groups=4)
NUM_CLASSES = 3


def _conv_case(options: dict, *, channels_last: bool = False):
    """A conv layer, a batch, the gradient of summed per-example losses wrt the output, and
    the reference per-example gradients ``{param: [B, *param.shape]}``, one backward each."""
    torch.manual_seed(0)
    layer = nn.Conv2d(**options)
    inputs = torch.randn(BATCH, layer.in_channels, 9, 8)
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    targets = torch.randn_like(layer(inputs))
    outputs = layer(inputs)
    losses = ((outputs - targets) ** 2).sum(dim=(1, 2, 3))
    (output_grads,) = torch.autograd.grad(losses.sum(), outputs)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    reference = {p: [] for p in params}
    for i in range(BATCH):
        example_loss = ((layer(inputs[i : i + 1]) - targets[i : i + 1]) ** 2).sum()
        for p, grad in zip(params, torch.autograd.grad(example_loss, params), strict=True):
            reference[p].append(grad)
    return layer, inputs, output_grads, {p: torch.stack(g) for p, g in reference.items()}


def _norms(per_example_grads: torch.Tensor) -> torch.Tensor:
    return per_example_grads.flatten(1).norm(dim=1)


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels-last"])
def test_the_registered_grad_sampler_gives_per_example_gradients(shape, channels_last):
    """Opacus' own conv grad sampler returns zeros for channels-last inputs; this one not."""
    assert GradSampleHooks.GRAD_SAMPLERS[nn.Conv2d] is compute_conv2d_grad_sample
    layer, inputs, output_grads, reference = _conv_case(CONV_SHAPES[shape], channels_last=channels_last)
    grads = compute_conv2d_grad_sample(layer, [inputs], output_grads)
    assert grads.keys() == reference.keys()  # no bias entry for bias=False
    for param, expected in reference.items():
        torch.testing.assert_close(grads[param], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("ghost", [True, False], ids=["ghost norm", "direct"])
def test_both_weight_norm_methods_equal_per_example_gradient_norms(shape, ghost, monkeypatch):
    layer, inputs, output_grads, reference = _conv_case(CONV_SHAPES[shape])
    norms = conv2d_weight_norms(layer, inputs, output_grads, ghost=ghost)
    torch.testing.assert_close(norms, _norms(reference[layer.weight]), rtol=1e-4, atol=0)
    monkeypatch.setattr(conv_samplers, "CHUNK_ELEMENTS", 1)  # one example per chunk
    chunked = conv2d_weight_norms(layer, inputs, output_grads, ghost=ghost)
    torch.testing.assert_close(chunked, _norms(reference[layer.weight]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_the_registered_norm_sampler_gives_weight_and_bias_norms(shape):
    registered = GradSampleHooksFastGradientClipping.NORM_SAMPLERS[nn.Conv2d]
    assert registered is compute_conv2d_norm_sample
    layer, inputs, output_grads, reference = _conv_case(CONV_SHAPES[shape])
    norms = compute_conv2d_norm_sample(layer, [inputs], output_grads)
    assert norms.keys() == reference.keys()  # no bias entry for bias=False
    for param, expected in reference.items():
        torch.testing.assert_close(norms[param], _norms(expected), rtol=1e-4, atol=0)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost norm", "direct"])
def test_channels_last_inputs_give_the_same_norms(ghost):
    case = _conv_case(CONV_SHAPES["3x3 padded"], channels_last=True)
    layer, inputs, output_grads, reference = case
    assert not inputs.is_contiguous()
    norms = conv2d_weight_norms(layer, inputs, output_grads, ghost=ghost)
    torch.testing.assert_close(norms, _norms(reference[layer.weight]), rtol=1e-4, atol=0)


def test_an_empty_batch_has_no_gradients_and_no_norms():
    layer, inputs, output_grads, _ = _conv_case(CONV_SHAPES["3x3 padded"])
    norms = compute_conv2d_norm_sample(layer, [inputs[:0]], output_grads[:0])
    assert [n.shape for n in norms.values()] == [(0,), (0,)]
    grads = compute_conv2d_grad_sample(layer, [inputs[:0]], output_grads[:0])
    assert [g.shape for g in grads.values()] == [(0, 6, 4, 3, 3), (0, 6)]


def test_the_cheaper_method_is_ghost_norm_only_when_positions_are_few():
    layer = nn.Conv2d(64, 64, kernel_size=3)  # p * D = 64 * 576 = 36864
    assert prefers_ghost_norm(layer, 8 * 8)  # 2 * 64² = 8192
    assert not prefers_ghost_norm(layer, 16 * 16)  # 2 * 256² = 131072
    assert not prefers_ghost_norm(nn.Conv2d(1, 32, kernel_size=3), 8 * 8)  # 32 * 9 = 288


def _unet_data(n: int) -> TensorDataset:
    """Images with their own fixed noise and timesteps, so every mode sees the same loss."""
    generator = torch.Generator().manual_seed(1)
    shape = (n, TINY_UNET.channels, TINY_UNET.resolution, TINY_UNET.resolution)
    return TensorDataset(
        torch.rand(shape, generator=generator) * 2 - 1,
        torch.randint(0, NUM_CLASSES, (n,), generator=generator),
        torch.randn(shape, generator=generator),
        torch.randint(0, TINY_UNET.train_timesteps, (n,), generator=generator),
    )


def _fixed_draw_loss():
    scheduler = make_noise_scheduler(TINY_UNET)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels, noise, timesteps = batch
        return denoising_loss(model, scheduler, images, labels, noise=noise, timesteps=timesteps)

    return loss


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_unet(TINY_UNET, NUM_CLASSES)


def _first_step_gradient(mode: str, data: TensorDataset, *, max_grad_norm: float) -> torch.Tensor:
    """The clipped, averaged gradient the optimizer consumed at step 1 (σ = 0), flattened."""
    unet = _tiny_unet()
    captured = []

    def keep_first(step: int, _loss: float) -> None:
        if step == 1:
            captured.extend(p.grad.detach().flatten().clone() for p in unet.parameters())

    train_local(
        unet,
        data,
        _fixed_draw_loss(),
        epochs=1,
        batch_size=len(data),
        lr=1e-3,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        delta=1e-3,
        grad_sample_mode=mode,
        seed=0,
        progress=keep_first,
    )
    return torch.cat(captured)


def _clipped_mean_by_autograd(data: TensorDataset, *, max_grad_norm: float) -> torch.Tensor:
    """DP-SGD's step with q = 1 and σ = 0 from one autograd backward per example:
    Σ_i g_i · min(1, C / ||g_i||) / n."""
    unet, loss = _tiny_unet(), _fixed_draw_loss()
    params = list(unet.parameters())
    total = torch.zeros(sum(p.numel() for p in params))
    for i in range(len(data)):
        example = tuple(t[i : i + 1] for t in data.tensors)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss(unet, example).sum(), params)])
        total += grad * min(1.0, max_grad_norm / grad.norm().item())
    return total / len(data)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_step_on_the_unet_equals_the_clipped_per_example_gradients(mode, monkeypatch):
    decisions = []

    def recording_sampler(layer, activations, backprops):
        decisions.append(prefers_ghost_norm(layer, backprops.shape[2] * backprops.shape[3]))
        return compute_conv2d_norm_sample(layer, activations, backprops)

    samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    monkeypatch.setitem(samplers, nn.Conv2d, recording_sampler)
    data = _unet_data(6)  # batch_size = n: q = 1, every example in the one step
    # A small bound clips every example: the step is Σ C g_i / ||g_i||, so any wrong norm shows.
    expected = _clipped_mean_by_autograd(data, max_grad_norm=1e-3)
    step = _first_step_gradient(mode, data, max_grad_norm=1e-3)
    if mode == "ghost":
        n_convs = sum(isinstance(m, nn.Conv2d) for m in _tiny_unet().modules())
        assert len(decisions) == n_convs and set(decisions) == {True, False}  # both methods ran
    assert expected.norm() > 0
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_autograd_skips_conv_parameter_gradients_only_inside_the_context():
    first, second = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)
    model = nn.Sequential(first, nn.SiLU(), second)
    images = torch.randn(3, 1, 8, 8)
    with without_summed_conv_grads(model):
        model(images).square().sum().backward()
    # the first conv's input needs no gradient: it stays attached so gradients reach its hooks
    assert first.weight.grad is not None and first.bias.grad is not None
    assert second.weight.grad is None and second.bias.grad is None
    assert all("_conv_forward" not in conv.__dict__ for conv in (first, second))
    model(images).square().sum().backward()
    assert second.weight.grad is not None


def test_a_dp_round_leaves_the_convolutions_as_they_were():
    unet = _tiny_unet()
    train_local(
        unet,
        _unet_data(6),
        _fixed_draw_loss(),
        epochs=1,
        batch_size=3,
        lr=1e-3,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-3,
        seed=0,
    )
    assert not [m for m in unet.modules() if "_conv_forward" in m.__dict__]


def test_ghost_training_spends_the_epsilon_of_the_rdp_analysis():
    sigma, delta = 1.0, 1e-3
    result = train_local(
        build_unet(TINY_UNET, NUM_CLASSES),
        _unet_data(12),
        _fixed_draw_loss(),
        epochs=2,
        batch_size=4,
        lr=1e-3,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        delta=delta,
        grad_sample_mode="ghost",
        seed=0,
    )
    assert result.sample_rate == pytest.approx(1 / 3)  # q = 1 / ceil(12 / 4)
    assert result.steps == 6  # 3 Poisson batches per epoch
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1 / 3, noise_multiplier=sigma, steps=6, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert result.epsilon == pytest.approx(expected, rel=0.01)
