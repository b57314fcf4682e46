"""Opacus samplers for ``nn.Conv2d``: per-example gradients and their norms; importing registers both.

Per-example gradients (hooks mode). Opacus 1.6's own Conv2d grad sampler unfolds the whole
batch's input (``B x C_in·kh·kw x T`` floats: a copy ``kh·kw`` times the size of the input)
and multiplies it with the output gradients. On a CPU that copy is most of DP-SGD's overhead for a
small UNet. :func:`compute_conv2d_grad_sample` forms the same per-example gradients as the
weight gradient of one convolution whose groups are the examples
(``torch.nn.grad.conv2d_weight``), which never materialises the unfolded patches, nor, for
zero padding, a padded copy of the input.

Per-example norms (ghost clipping). Opacus 1.6 has norm samplers for ``nn.Linear`` and
``nn.Embedding`` only. In ghost mode every other layer falls back to *fast gradient clipping*:
its grad sampler materialises the whole batch's per-example gradients, Opacus takes their
norms and drops them. :func:`compute_conv2d_norm_sample` gives the same norms for
convolutions, exactly, forming at most one layer's per-example gradients for a chunk of
examples at a time, and often none.

A convolution is a linear map applied at ``T`` output positions. Unfolding example ``i``'s
(padded) input gives its patches ``U_i`` (``D x T`` per group, ``D = in_channels / groups *
kh * kw``); with the output gradient ``G_i`` (``p x T`` per group, ``p = out_channels /
groups``) the weight gradient of a group is ``G_i U_iᵀ`` (``p x D``). Its squared Frobenius
norm has two exact forms:

- ghost norm (Goodfellow 2015; Li et al. 2021): ``<G_iᵀ G_i, U_iᵀ U_i>``, two ``T x T`` Gram
  matrices per example and group;
- direct: form ``G_i U_iᵀ`` as above and sum its squares.

Per layer the smaller intermediate wins: ghost norm when ``2 T² <= p D`` — the rule of Li et
al. (2021, appendix) and Bu et al. (2022, "mixed ghost clipping"). The batch is processed in
chunks of examples so that the intermediates of a chunk stay below ``CHUNK_ELEMENTS``.
Both samplers read inputs of any memory layout (channels-last included).

In hooks mode autograd's own batch-summed weight and bias gradients of every convolution are
computed and then discarded: the optimizer steps on the clipped sum of the per-example ones.
:func:`without_summed_conv_grads` keeps autograd from forming them (a sixth of a DP step's time
for the UNet on a CPU).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import Tensor, nn

__all__ = [
    "CHUNK_ELEMENTS",
    "compute_conv2d_grad_sample",
    "compute_conv2d_norm_sample",
    "conv2d_weight_norms",
    "prefers_ghost_norm",
    "without_summed_conv_grads",
]

# Elements (not bytes) of the per-chunk intermediates: unfolded patches + Gram matrices or
# per-example gradients. 2**24 float32 is 64 MB: large enough for efficient matrix products,
# small enough to stay below the memory of the model's own activations.
CHUNK_ELEMENTS = 2**24


def prefers_ghost_norm(layer: nn.Conv2d, output_positions: int) -> bool:
    """True when the ghost norm's two ``T x T`` Grams are no larger than one group's
    per-example weight gradient (``p x D``), i.e. ``2 T² <= p D``."""
    out_per_group, in_per_group = _group_sizes(layer)
    return 2 * output_positions**2 <= out_per_group * in_per_group


def conv2d_weight_norms(layer: nn.Conv2d, inputs: Tensor, output_grads: Tensor, *, ghost: bool) -> Tensor:
    """Per-example norms ``[B]`` of the weight gradient, by the ghost norm or directly.

    ``inputs`` is the layer's input ``[B, C_in, H, W]``, ``output_grads`` the gradient of
    the summed per-example losses with respect to its output ``[B, C_out, H', W']``.
    """
    _, in_per_group = _group_sizes(layer)
    positions = output_grads.shape[2] * output_grads.shape[3]
    if ghost:
        per_example = layer.groups * (in_per_group * positions + 2 * positions**2)
        squared_norms = _ghost_squared_norms
    else:
        per_example = layer.weight.numel()
        squared_norms = _direct_squared_norms
    padded = _pad(layer, inputs)
    chunk = max(1, CHUNK_ELEMENTS // per_example)
    squared = [padded.new_zeros(0)]  # an empty Poisson batch has no norms
    for start in range(0, inputs.shape[0], chunk):
        end = start + chunk
        squared.append(squared_norms(layer, padded[start:end], output_grads[start:end]))
    return torch.cat(squared).clamp(min=0).sqrt()


@register_grad_sampler(nn.Conv2d)
def compute_conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus grad sampler: per-example gradients ``[B, *param.shape]`` of weight and bias."""
    inputs = activations[0].to(backprops.dtype)
    grads = {}
    if layer.weight.requires_grad:
        inputs, padding = _input_and_padding(layer, inputs)
        grads[layer.weight] = _per_example_weight_grads(layer, inputs, backprops, padding=padding)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3))
    return grads


@contextlib.contextmanager
def without_summed_conv_grads(model: nn.Module) -> Iterator[None]:
    """Within: each Conv2d whose input carries a gradient runs its forward on detached weight
    and bias, so backward computes its input gradient only; the parameters' ``.grad`` is then
    left to the DP optimizer, which sets it from the clipped per-example gradients.

    For Opacus' hooks mode only (ghost clipping's second pass needs autograd's gradients).
    A convolution whose input needs no gradient (the first layer) keeps its parameters
    attached: otherwise its output would carry no gradient and its backward hook never fire.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        conv._conv_forward = functools.partial(_conv_forward_on_detached_params, conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv._conv_forward


def _conv_forward_on_detached_params(conv: nn.Conv2d, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if inputs.requires_grad:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    return type(conv)._conv_forward(conv, inputs, weight, bias)


@register_norm_sampler(nn.Conv2d)
def compute_conv2d_norm_sample(
    layer: nn.Conv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus norm sampler: per-example gradient norms ``[B]`` of weight and bias."""
    inputs = activations[0].to(backprops.dtype)
    norms = {}
    if layer.weight.requires_grad:
        positions = backprops.shape[2] * backprops.shape[3]
        ghost = prefers_ghost_norm(layer, positions)
        norms[layer.weight] = conv2d_weight_norms(layer, inputs, backprops, ghost=ghost)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = backprops.sum(dim=(2, 3)).norm(dim=1)
    return norms


def _group_sizes(layer: nn.Conv2d) -> tuple[int, int]:
    """(p, D): output channels and patch length (input channels x kernel) per group."""
    kh, kw = layer.kernel_size
    return layer.out_channels // layer.groups, layer.in_channels // layer.groups * kh * kw


def _pad(layer: nn.Conv2d, inputs: Tensor) -> Tensor:
    """The input as the convolution sees it, so both forms can run with ``padding=0``.

    Uses the layer's own ``_reversed_padding_repeated_twice``, as ``Conv2d._conv_forward``
    does for non-zero padding modes; it also resolves "same" and "valid".
    """
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(inputs, layer._reversed_padding_repeated_twice, mode=mode)


def _input_and_padding(layer: nn.Conv2d, inputs: Tensor) -> tuple[Tensor, int | tuple[int, ...]]:
    """(input, padding) for ``conv2d_weight``: zero padding given as numbers is left to the
    convolution, which saves a padded copy of every input; anything else is applied here."""
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return inputs, layer.padding
    return _pad(layer, inputs), 0


def _ghost_squared_norms(layer: nn.Conv2d, padded: Tensor, output_grads: Tensor) -> Tensor:
    """``<Gᵀ G, Uᵀ U>`` summed over groups, per example: ``[b]``."""
    batch, groups = padded.shape[0], layer.groups
    patches = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, padding=0, stride=layer.stride).view(
        batch, groups, -1, output_grads.shape[2] * output_grads.shape[3]
    )  # [b, g, D, T]
    grads = output_grads.reshape(batch, groups, -1, patches.shape[-1])  # [b, g, p, T]
    patch_gram = patches.transpose(-1, -2) @ patches  # [b, g, T, T]
    grad_gram = grads.transpose(-1, -2) @ grads
    return (patch_gram * grad_gram).sum(dim=(1, 2, 3))


def _direct_squared_norms(layer: nn.Conv2d, padded: Tensor, output_grads: Tensor) -> Tensor:
    """Squared norms ``[b]`` of the per-example weight gradients, formed for this chunk only."""
    return _per_example_weight_grads(layer, padded, output_grads).flatten(1).square().sum(dim=1)


def _per_example_weight_grads(
    layer: nn.Conv2d, inputs: Tensor, output_grads: Tensor, *, padding: int | tuple[int, ...] = 0
) -> Tensor:
    """``[b, *weight.shape]``: the weight gradient of one convolution with the examples as
    extra groups; ``inputs`` already padded unless ``padding`` says otherwise."""
    batch = inputs.shape[0]
    if batch == 0:
        return inputs.new_zeros((0, *layer.weight.shape))
    per_example = torch.nn.grad.conv2d_weight(
        inputs.reshape(1, batch * layer.in_channels, *inputs.shape[2:]),
        (batch * layer.out_channels, *layer.weight.shape[1:]),
        output_grads.reshape(1, batch * layer.out_channels, *output_grads.shape[2:]),
        stride=layer.stride,
        padding=padding,
        dilation=layer.dilation,
        groups=batch * layer.groups,
    )
    return per_example.view(batch, *layer.weight.shape)
