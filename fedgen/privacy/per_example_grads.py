"""Per-example gradients for DP-SGD's hooks mode: each layer's output gradient to its sampler.

Opacus' ``GradSampleHooks`` and this module use the same per-layer samplers (Opacus'
``GRAD_SAMPLERS`` registry, fedgen's Conv2d sampler included) on the same inputs: a layer's
input and the gradient of the summed per-example losses with respect to its output. What
differs is the work around them, per layer and step. Opacus 1.6 registers a *full* backward
hook (an extra autograd node on the layer's inputs and outputs), multiplies every output
gradient by the batch size when the loss is a mean, and copies each per-example gradient into
a zero-filled buffer of the batch's length, in case a later call adds to it. For the 32x32 UNet
at batch 64 those copies, scalings and hooks were a sixth of a DP step (BENCHMARKS.md).

Here a forward hook keeps the layer's input and puts a tensor hook on its output; the output's
gradient goes to the sampler and the result becomes ``grad_sample`` as it is. The caller runs
Opacus with ``grad_sample_mode="no_op"`` (its optimizer clips and noises ``grad_sample``; no
Opacus hooks) and backpropagates the *sum* of the per-row losses, so each row's gradient comes
unscaled; the optimizer's ``loss_reduction="mean"`` divides the noised sum by the expected batch.

A layer whose parameters would receive two per-example gradients in one step (a module called
twice in a forward, or two backward passes before a step) is refused: summing them is right for
the first case and a privacy bug for the second, and nothing here tells the two apart. Layers
with buffers (BatchNorm's running statistics) are refused, as Opacus refuses them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from opacus.grad_sample import GradSampleHooks
from torch import Tensor, nn

from fedgen.errors import FedgenError
from fedgen.privacy import conv_samplers  # noqa: F401  (registers fedgen's Conv2d samplers)

__all__ = ["per_example_grads"]


@contextlib.contextmanager
def per_example_grads(model: nn.Module) -> Iterator[None]:
    """Within: every backward pass of a training forward sets ``grad_sample`` ``[B, *shape]``
    on each trainable parameter; ``grad_sample`` must be None before (the DP optimizer's
    ``zero_grad`` sets it so)."""
    samplers = [  # every layer checked before any hook is added
        (module, _sampler(module))
        for module in model.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    handles = [module.register_forward_hook(functools.partial(_hook_output, sampler)) for module, sampler in samplers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sampler(module: nn.Module):
    if any(True for _ in module.buffers(recurse=False)):
        # As Opacus refuses them: buffers such as BatchNorm's running statistics are computed
        # from the data and released with the weights, outside DP-SGD's clipping and noise.
        raise FedgenError(
            f"{type(module).__name__} has trainable parameters and buffers (e.g. running "
            "statistics of the data), which DP-SGD does not privatise: freeze it or replace it"
        )
    try:
        return GradSampleHooks.GRAD_SAMPLERS[type(module)]
    except KeyError:
        raise FedgenError(
            f"no per-example gradient sampler for {type(module).__name__}, which has trainable "
            "parameters: freeze it or train with grad_sample_mode 'ghost'"
        ) from None


def _hook_output(sampler, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    if module.training and isinstance(output, Tensor) and output.requires_grad:
        activations = [t.detach() for t in inputs]
        output.register_hook(functools.partial(_store, sampler, module, activations))


def _store(sampler, module: nn.Module, activations: list[Tensor], output_grad: Tensor) -> None:
    for param, grad_sample in sampler(module, activations, output_grad.detach()).items():
        if getattr(param, "grad_sample", None) is not None:
            raise FedgenError(
                f"{type(module).__name__} got a second per-example gradient before the optimizer "
                "step (a module used twice in one forward, or two backward passes): "
                "DP-SGD's hooks mode supports neither"
            )
        param.grad_sample = grad_sample
