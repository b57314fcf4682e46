"""DP-SGD around fedgen's training loop: Opacus' Poisson loader, optimizer and accountant.

Opacus is attached to the caller's module without wrapping it and detached when the round
ends, so the module keeps its ``state_dict`` keys and can be trained again next round. In
hooks mode the per-example gradients come from fedgen.privacy.per_example_grads (Opacus runs
in ``no_op`` grad-sample mode); ghost mode is Opacus' own ghost clipping, with fedgen's Conv2d
norm sampler. The loop itself is fedgen.training's, with or without DP.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedgen.errors import FedgenError
from fedgen.privacy.accounting import HistoryEntry
from fedgen.privacy.conv_samplers import (  # importing registers the Conv2d samplers
    without_summed_conv_grads,
)
from fedgen.privacy.per_example_grads import per_example_grads

__all__ = [
    "GRAD_SAMPLE_MODES",
    "noise_source",
    "check_secure_mode",
    "PerExampleLoss",
    "BatchBackward",
    "PrivateRound",
    "private_round",
    "set_empty_gradients",
    "was_accumulation_only",
]

PerExampleLoss = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]

# "hooks": per-example gradients materialised (fedgen.privacy.per_example_grads; noise
#          multiplicity possible).
# "ghost": Opacus' ghost clipping, per-example gradient norms only (Linear, Embedding, Conv2d:
#          conv_samplers).
GRAD_SAMPLE_MODES = ("hooks", "ghost")

# Warnings Opacus raises on every round that fedgen has already handled (see module docstring);
# whether the noise came from a secure generator is stated in the run's output and report instead
# (noise_source).
_KNOWN_OPACUS_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
)
# Attributes Opacus leaves behind after ``cleanup()``.
_OPACUS_PARAM_LEFTOVERS = ("summed_grad",)
_OPACUS_MODULE_LEFTOVERS = ("activations", "max_batch_len")


def noise_source(secure_mode: bool) -> str:
    """Where the DP noise and the Poisson batches come from, in one sentence."""
    if secure_mode:
        return (
            "a cryptographically secure generator (Opacus secure_mode: torchcsprng reading /dev/urandom), "
            "the noise drawn to resist floating-point attacks"
        )
    return (
        "torch's Mersenne Twister, seeded from the operating system's entropy every round: NOT a "
        "cryptographically secure generator (privacy.secure_mode = false)"
    )


def check_secure_mode(secure_mode: bool) -> None:
    """Opacus' secure_mode needs torchcsprng; without it, one line instead of Opacus' ImportError."""
    if secure_mode and importlib.util.find_spec("torchcsprng") is None:
        raise FedgenError(
            f"privacy.secure_mode needs torchcsprng, which is not installed (its last release supports "
            f"torch 1.x, this is torch {torch.__version__}); set privacy.secure_mode = false"
        )


@dataclass
class PrivateRound:
    """What the training loop runs on under DP: Opacus' Poisson batches (physical batches, if
    bounded), its optimizer (clip, noise, step) and the per-batch forward/backward."""

    batches: Iterable
    optimizer: torch.optim.Optimizer
    backward: BatchBackward
    engine: PrivacyEngine

    def round_entry(self, steps: int) -> HistoryEntry:
        """This round's accountant entry (σ, q, steps), checked against the steps taken."""
        (entry,) = self.engine.accountant.history
        assert entry[2] == steps, (entry, steps)
        return entry


@contextlib.contextmanager
def private_round(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    per_example_loss: PerExampleLoss,
    *,
    params: list[Tensor],
    noise_multiplier: float,
    max_grad_norm: float,
    noise_multiplicity: int,
    grad_sample_mode: str,
    noise_generator: torch.Generator,
    max_physical_batch_size: int | None,
    secure_mode: bool = False,
) -> Iterator[PrivateRound]:
    """Opacus attached to ``model`` for one round of DP-SGD; detached again when it ends.

    ``secure_mode`` is Opacus' own: its secure generator replaces ``noise_generator``.
    """
    check_secure_mode(secure_mode)
    ghost = grad_sample_mode == "ghost"
    modules_before = {id(m) for m in model.modules() if _has_any(m, _OPACUS_MODULE_LEFTOVERS)}
    with _quiet_known_opacus_warnings():
        # Only the (σ, q, steps) history of Opacus' accountant is used (fedgen.privacy.accounting).
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
        attached = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=_PerExampleCriterion(per_example_loss),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            loss_reduction="mean",
            poisson_sampling=True,
            clipping="flat",
            noise_generator=None if secure_mode else noise_generator,
            # hooks mode: Opacus' optimizer on the gradients per_example_grads sets
            grad_sample_mode="ghost" if ghost else "no_op",
            wrap_model=False,  # hooks on the caller's module: no `_module.` wrapper
        )
        if ghost:
            hooks, dp_optimizer, ghost_criterion, dp_loader = attached
        else:
            (hooks, dp_optimizer, dp_loader), ghost_criterion = attached, None
        try:
            backward = BatchBackward(
                model,
                per_example_loss,
                multiplicity=noise_multiplicity,
                per_sample_params=() if ghost else params,
                ghost_criterion=ghost_criterion,
            )
            physical = _physical_batches(dp_loader, dp_optimizer, max_physical_batch_size)
            with _per_example_hooks(model, ghost), physical as batches:
                yield PrivateRound(batches, dp_optimizer, backward, engine)
        finally:
            _detach_opacus(hooks, model, keep_modules=modules_before)


@contextlib.contextmanager
def _per_example_hooks(model: nn.Module, ghost: bool) -> Iterator[None]:
    """fedgen's per-example gradient hooks for hooks mode; ghost mode has Opacus' own, and
    its second backward pass needs autograd's summed gradients of the convolutions."""
    if ghost:
        yield
        return
    with per_example_grads(model), without_summed_conv_grads(model):
        yield


@dataclass(frozen=True)
class BatchBackward:
    """Forward and backward of one physical batch, leaving what the optimizer consumes.

    Returns the per-row losses. Without DP the backward pass is the mean loss's. In DP's
    hooks mode (``per_sample_params`` given) it is the summed loss's, so that the
    per-example gradient hooks see each row's own gradient; ``grad_sample`` is then averaged
    over the draws. With ``ghost_criterion``, Opacus runs ghost clipping's two passes (norms,
    then the clipped sum).
    """

    model: nn.Module
    per_example_loss: PerExampleLoss
    multiplicity: int
    per_sample_params: Sequence[Tensor] = ()
    ghost_criterion: DPLossFastGradientClipping | None = None

    def __call__(self, batch: tuple[Tensor, ...]) -> Tensor:
        batch = _repeat_rows(batch, self.multiplicity)
        if self.ghost_criterion is not None:
            loss = self.ghost_criterion(self.model, batch)
            loss.backward()
            return loss.loss_per_sample.detach()
        losses = self.per_example_loss(self.model, batch)
        assert losses.shape == batch[0].shape[:1], (
            f"per_example_loss must return one loss per row: got {tuple(losses.shape)} for {len(batch[0])} rows"
        )
        (losses.sum() if self.per_sample_params else losses.mean()).backward()
        _average_over_draws(self.per_sample_params, self.multiplicity)
        return losses.detach()


class _PerExampleCriterion:
    """``per_example_loss`` in the shape of the criterion Opacus' ghost clipping wraps.

    Opacus sets ``reduction`` to "none" around the call and expects one loss per row, which
    ``per_example_loss`` always returns; ``reduction`` says how Opacus reduces them.
    """

    reduction = "mean"

    def __init__(self, per_example_loss: PerExampleLoss):
        self.per_example_loss = per_example_loss

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return self.per_example_loss(model, batch)


def _repeat_rows(batch: tuple[Tensor, ...], multiplicity: int) -> tuple[Tensor, ...]:
    """Each example's row ``multiplicity`` times in a row: [B, ...] -> [B*K, ...]."""
    if multiplicity == 1:
        return batch
    return tuple(tensor.repeat_interleave(multiplicity, dim=0) for tensor in batch)


def _average_over_draws(params: Sequence[Tensor], multiplicity: int) -> None:
    """Per-example gradient = mean of its K rows' gradients: grad_sample [B*K,...] -> [B,...].

    The backward pass of the summed losses leaves each row's own loss gradient in
    ``grad_sample``; their mean over the K draws is the gradient of the example's mean loss,
    which the optimizer then clips once per example and divides by the expected number of
    examples.
    """
    if multiplicity == 1:
        return
    for p in params:
        rows = p.grad_sample.shape[0]
        assert rows % multiplicity == 0, (rows, multiplicity)
        p.grad_sample = p.grad_sample.view(rows // multiplicity, multiplicity, *p.grad_sample.shape[1:]).mean(dim=1)


def set_empty_gradients(params: Sequence[Tensor]) -> None:
    """Gradients of a batch with no examples, for both hooks and ghost optimizers."""
    for p in params:
        p.grad = torch.zeros_like(p)
        p.grad_sample = p.new_zeros((0, *p.shape))


def was_accumulation_only(optimizer: torch.optim.Optimizer) -> bool:
    """True after a DPOptimizer.step() that only clipped and accumulated a physical batch
    (BatchMemoryManager: the logical batch goes on); False after a real step."""
    return getattr(optimizer, "_is_last_step_skipped", False)


@contextlib.contextmanager
def _physical_batches(
    loader: DataLoader, optimizer: torch.optim.Optimizer, max_physical_batch_size: int | None
) -> Iterator[DataLoader]:
    if max_physical_batch_size is None:
        yield loader
        return
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
    ) as physical_loader:
        yield physical_loader


def _detach_opacus(hooks, model: nn.Module, *, keep_modules: set[int]) -> None:
    """Remove Opacus' hooks and every attribute it added, leaving the plain module."""
    hooks.cleanup()
    for p in model.parameters():
        for attr in _OPACUS_PARAM_LEFTOVERS:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        if id(module) in keep_modules:
            continue
        for attr in _OPACUS_MODULE_LEFTOVERS:
            if hasattr(module, attr):
                delattr(module, attr)


def _has_any(module: nn.Module, attrs: Sequence[str]) -> bool:
    return any(hasattr(module, attr) for attr in attrs)


@contextlib.contextmanager
def _quiet_known_opacus_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _KNOWN_OPACUS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
