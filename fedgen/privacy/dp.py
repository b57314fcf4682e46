"""One site's local training for one round: DP-SGD with Opacus, or plain training without DP.

Modality-agnostic: the image track (diffusion UNet) and the text track (LoRA Llama) each plug
in a model, a dataset of tensor tuples and a ``per_example_loss(model, batch) -> [rows]``.
The same loop runs with and without DP; DP adds Opacus' pieces around it:

- Poisson sampling at ``q = 1 / ceil(n / batch_size)`` (see :mod:`fedgen.privacy.accounting`),
- per-example gradients (hooks, or ghost clipping that only forms their norms), flat clipping
  to ``max_grad_norm`` and Gaussian noise ``σ · max_grad_norm`` on the summed gradient,
- an RDP accountant whose round entry ``(σ, q, steps)`` composes with earlier rounds' history.

Opacus is attached to the caller's module without wrapping it and detached when the round
ends, so the module keeps its ``state_dict`` keys and can be trained again next round.

Noise multiplicity K (DPDM, Dockhorn et al. 2023): every example is repeated K times in the
batch so the loss sees K independent noise/timestep draws; the K per-row gradients are
averaged into the example's gradient before clipping, so each example still contributes one
clipped gradient and the accounting is that of K = 1.

Randomness: batch sampling and DP noise must be unpredictable to whoever sees the updates
(a known noise seed lets the noise be subtracted; known batches void subsampling
amplification). They are seeded from the OS's entropy unless ``seed`` is given — for tests
and benchmarks only. Opacus' ``secure_mode`` (torchcsprng, floating-point-attack-safe
noise) is not used.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedgen.errors import FedgenError
from fedgen.privacy.accounting import (
    HistoryEntry,
    check_delta,
    epsilon_from_history,
    planned_steps,
)
from fedgen.privacy.conv_samplers import (  # importing registers the Conv2d samplers
    without_summed_conv_grads,
)
from fedgen.privacy.per_example_grads import per_example_grads

__all__ = ["GRAD_SAMPLE_MODES", "PerExampleLoss", "LocalTrainResult", "train_local"]

PerExampleLoss = Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
ProgressCallback = Callable[[int, float], None]

# "hooks": per-example gradients materialised (fedgen.privacy.per_example_grads; noise
#          multiplicity possible).
# "ghost": Opacus' ghost clipping, per-example gradient norms only (Linear, Embedding, Conv2d:
#          conv_samplers).
GRAD_SAMPLE_MODES = ("hooks", "ghost")

# Warnings Opacus raises on every round that fedgen has already handled (see module docstring).
_KNOWN_OPACUS_WARNINGS = (
    "Secure RNG turned off",
    "Full backward hook is firing when gradients are computed with respect to module outputs",
)
# Attributes Opacus leaves behind after ``cleanup()``.
_OPACUS_PARAM_LEFTOVERS = ("summed_grad",)
_OPACUS_MODULE_LEFTOVERS = ("activations", "max_batch_len")


@dataclass(frozen=True)
class LocalTrainResult:
    mean_loss: float  # mean per-row loss of the round; NOT privatised, keep it at the site
    num_examples: int  # training records at the site (FedAvg weight)
    steps: int  # optimizer steps taken this round
    sample_rate: float  # q
    noise_multiplier: float  # σ of this round; 0.0 = trained without DP
    epsilon: float  # cumulative ε over ``history`` at the given δ (inf without DP)
    history: tuple[HistoryEntry, ...]  # earlier rounds' entries + this round's (σ, q, steps)


def train_local(
    model: nn.Module,
    dataset: Dataset,
    per_example_loss: PerExampleLoss,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float | None,
    max_grad_norm: float,
    delta: float,
    history: Sequence[HistoryEntry] = (),
    noise_multiplicity: int = 1,
    grad_sample_mode: str = "hooks",
    seed: int | None = None,
    max_physical_batch_size: int | None = None,
    proximal_mu: float = 0.0,
    progress: ProgressCallback | None = None,
) -> LocalTrainResult:
    """Train ``model``'s trainable parameters in place with Adam for ``epochs`` epochs.

    ``noise_multiplier=None`` trains without DP (shuffled batches of ``batch_size``, ε = inf);
    a number runs DP-SGD with that σ (0 is allowed for tests: clipping without noise, ε = inf).
    ``per_example_loss(model, batch)`` returns one loss per batch row; ``batch`` is the
    dataset's tuple of tensors, each with rows repeated ``noise_multiplicity`` times.
    ``max_physical_batch_size`` splits DP's logical (Poisson) batches to bound memory.
    ``progress(step, loss)`` is called after each optimizer step, before gradients are
    cleared, with the step's mean per-row loss (nan for an empty Poisson batch).
    ``proximal_mu`` > 0 is FedProx's client term: after every step each trainable weight is
    pulled towards where the round started, w -= lr * mu * (w - w_start). It is decoupled from
    the gradient (as AdamW decouples weight decay) and uses no data, so the DP guarantee of the
    clipped, noised gradients is untouched.
    """
    n_records = len(dataset)
    private = noise_multiplier is not None
    _validate(
        n_records=n_records,
        private=private,
        noise_multiplier=noise_multiplier,
        noise_multiplicity=noise_multiplicity,
        grad_sample_mode=grad_sample_mode,
        delta=delta,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the model has no trainable parameters"
    sample_rate, _ = planned_steps(
        n_records=n_records, batch_size=batch_size, epochs_per_round=epochs, rounds=1
    )
    sampling_generator, noise_generator = _generators(seed, device=params[0].device)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=sampling_generator
    )
    optimizer = torch.optim.Adam(params, lr=lr)
    after_step = _proximal_pull(params, lr * proximal_mu) if proximal_mu > 0 else None
    was_training = model.training
    model.train()
    try:
        if private:
            loss_sum, rows, round_entry = _train_private(
                model,
                loader,
                optimizer,
                per_example_loss,
                params=params,
                epochs=epochs,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                noise_multiplicity=noise_multiplicity,
                grad_sample_mode=grad_sample_mode,
                noise_generator=noise_generator,
                max_physical_batch_size=max_physical_batch_size,
                after_step=after_step,
                progress=progress,
            )
        else:
            backward = _BatchBackward(model, per_example_loss, multiplicity=noise_multiplicity)
            loss_sum, rows, steps = _run_epochs(
                loader, optimizer, backward, params=params, epochs=epochs,
                after_step=after_step, progress=progress,
            )
            round_entry = (0.0, sample_rate, steps)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    full_history = tuple(_as_entry(entry) for entry in history) + (round_entry,)
    return LocalTrainResult(
        mean_loss=loss_sum / rows if rows else math.nan,
        num_examples=n_records,
        steps=round_entry[2],
        sample_rate=round_entry[1],
        noise_multiplier=round_entry[0],
        epsilon=epsilon_from_history(full_history, delta=delta),
        history=full_history,
    )


def _validate(
    *,
    n_records: int,
    private: bool,
    noise_multiplier: float | None,
    noise_multiplicity: int,
    grad_sample_mode: str,
    delta: float,
) -> None:
    if n_records < 1:
        raise FedgenError("the site has no training records")
    assert noise_multiplicity >= 1, noise_multiplicity
    assert grad_sample_mode in GRAD_SAMPLE_MODES, grad_sample_mode
    if not private:
        return
    if noise_multiplier < 0:
        raise FedgenError(f"noise_multiplier={noise_multiplier:g} must be at least 0")
    check_delta(delta, n_records)
    if grad_sample_mode == "ghost" and noise_multiplicity > 1:
        raise FedgenError(
            f"noise_multiplicity={noise_multiplicity} needs grad_sample_mode 'hooks': ghost "
            "clipping never forms the per-example gradients that the draws are averaged over"
        )


def _train_private(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    per_example_loss: PerExampleLoss,
    *,
    params: list[Tensor],
    epochs: int,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_multiplicity: int,
    grad_sample_mode: str,
    noise_generator: torch.Generator,
    max_physical_batch_size: int | None,
    after_step: Callable[[], None] | None,
    progress: ProgressCallback | None,
) -> tuple[float, int, HistoryEntry]:
    """DP-SGD epochs; returns (loss sum, rows, this round's accountant entry)."""
    ghost = grad_sample_mode == "ghost"
    modules_before = {id(m) for m in model.modules() if _has_any(m, _OPACUS_MODULE_LEFTOVERS)}
    with _quiet_known_opacus_warnings():
        engine = PrivacyEngine(accountant="rdp")
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
            noise_generator=noise_generator,
            # hooks mode: Opacus' optimizer on the gradients per_example_grads sets
            grad_sample_mode="ghost" if ghost else "no_op",
            wrap_model=False,  # hooks on the caller's module: no `_module.` wrapper
        )
        if ghost:
            hooks, dp_optimizer, ghost_criterion, dp_loader = attached
        else:
            (hooks, dp_optimizer, dp_loader), ghost_criterion = attached, None
        try:
            backward = _BatchBackward(
                model,
                per_example_loss,
                multiplicity=noise_multiplicity,
                per_sample_params=() if ghost else params,
                ghost_criterion=ghost_criterion,
            )
            physical = _physical_batches(dp_loader, dp_optimizer, max_physical_batch_size)
            with _per_example_hooks(model, ghost), physical as batches:
                loss_sum, rows, steps = _run_epochs(
                    batches, dp_optimizer, backward, params=params, epochs=epochs,
                    after_step=after_step, progress=progress,
                )
        finally:
            _detach_opacus(hooks, model, keep_modules=modules_before)
    (round_entry,) = engine.accountant.history
    assert round_entry[2] == steps, (round_entry, steps)
    return loss_sum, rows, round_entry


@contextlib.contextmanager
def _per_example_hooks(model: nn.Module, ghost: bool) -> Iterator[None]:
    """fedgen's per-example gradient hooks for hooks mode; ghost mode has Opacus' own, and
    its second backward pass needs autograd's summed gradients of the convolutions."""
    if ghost:
        yield
        return
    with per_example_grads(model), without_summed_conv_grads(model):
        yield


def _proximal_pull(params: list[Tensor], strength: float) -> Callable[[], None]:
    start = [p.detach().clone() for p in params]

    @torch.no_grad()
    def pull() -> None:
        for p, p0 in zip(params, start, strict=True):
            p.sub_(strength * (p - p0))

    return pull


def _run_epochs(
    batches: DataLoader,
    optimizer: torch.optim.Optimizer,
    backward: _BatchBackward,
    *,
    params: list[Tensor],
    epochs: int,
    after_step: Callable[[], None] | None,
    progress: ProgressCallback | None,
) -> tuple[float, int, int]:
    """The training loop shared by DP and non-DP; returns (loss sum, rows, optimizer steps)."""
    device = params[0].device
    loss_sum, rows, steps = 0.0, 0, 0
    step_loss_sum, step_rows = 0.0, 0
    for _ in range(epochs):
        for batch in batches:
            batch = tuple(tensor.to(device) for tensor in batch)
            if len(batch[0]) == 0:
                # An empty Poisson batch is still a step of the mechanism: noise only.
                _set_empty_gradients(params)
            else:
                losses = backward(batch)
                step_loss_sum += losses.sum().item()
                step_rows += losses.numel()
            optimizer.step()
            if not _was_accumulation_only(optimizer):
                steps += 1
                if after_step is not None:
                    after_step()
                if progress is not None:
                    progress(steps, step_loss_sum / step_rows if step_rows else math.nan)
                loss_sum, rows = loss_sum + step_loss_sum, rows + step_rows
                step_loss_sum, step_rows = 0.0, 0
            optimizer.zero_grad()
    return loss_sum, rows, steps


@dataclass(frozen=True)
class _BatchBackward:
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
            f"per_example_loss must return one loss per row: got {tuple(losses.shape)} "
            f"for {len(batch[0])} rows"
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
        p.grad_sample = p.grad_sample.view(
            rows // multiplicity, multiplicity, *p.grad_sample.shape[1:]
        ).mean(dim=1)


def _set_empty_gradients(params: Sequence[Tensor]) -> None:
    """Gradients of a batch with no examples, for both hooks and ghost optimizers."""
    for p in params:
        p.grad = torch.zeros_like(p)
        p.grad_sample = p.new_zeros((0, *p.shape))


def _was_accumulation_only(optimizer: torch.optim.Optimizer) -> bool:
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


def _generators(
    seed: int | None, *, device: torch.device
) -> tuple[torch.Generator, torch.Generator]:
    """(batch sampling generator, DP noise generator), independent streams from one seed,
    from the OS's entropy when ``seed`` is None."""
    root = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    sampling_seed, noise_seed = torch.randint(2**62, (2,), generator=root).tolist()
    sampling = torch.Generator().manual_seed(sampling_seed)
    noise = torch.Generator(device=device).manual_seed(noise_seed)
    return sampling, noise


def _as_entry(entry: Sequence[float]) -> HistoryEntry:
    noise_multiplier, sample_rate, steps = entry
    return float(noise_multiplier), float(sample_rate), int(steps)


@contextlib.contextmanager
def _quiet_known_opacus_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _KNOWN_OPACUS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
