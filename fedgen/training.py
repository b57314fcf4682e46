"""One site's local training for one round: the loop, with DP-SGD (Opacus) or without DP.

Modality-agnostic: the image track (diffusion UNet) and the text track (LoRA Llama) each plug
in a model, a dataset of tensor tuples and a ``per_example_loss(model, batch) -> [rows]``.
The same loop runs with and without DP; DP (fedgen.privacy.dp_sgd) adds Opacus' pieces around
it:

- Poisson sampling at ``q = 1 / ceil(n / batch_size)`` (see :mod:`fedgen.privacy.accounting`),
- per-example gradients (hooks, or ghost clipping that only forms their norms), flat clipping
  to ``max_grad_norm`` and Gaussian noise ``σ · max_grad_norm`` on the summed gradient,
- an accountant (RDP or PRV, fedgen.privacy.accounting) whose round entry ``(σ, q, steps)``
  composes with earlier rounds' history.

Noise multiplicity K (DPDM, Dockhorn et al. 2023): every example is repeated K times in the
batch so the loss sees K independent noise/timestep draws; the K per-row gradients are
averaged into the example's gradient before clipping, so each example still contributes one
clipped gradient and the accounting is that of K = 1.

Randomness: batch sampling and DP noise must be unpredictable to whoever sees the updates
(a known noise seed lets the noise be subtracted; known batches void subsampling
amplification). They are seeded from the OS's entropy unless ``seed`` is given — for tests
and benchmarks only. ``secure_mode`` turns on Opacus' own instead (torchcsprng's /dev/urandom
generator, noise drawn to resist floating-point attacks); it needs torchcsprng installed.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedgen.errors import FedgenError
from fedgen.privacy.accounting import HistoryEntry, check_delta, epsilon_from_history, planned_steps
from fedgen.privacy.dp_sgd import (
    GRAD_SAMPLE_MODES,
    BatchBackward,
    PerExampleLoss,
    private_round,
    set_empty_gradients,
    was_accumulation_only,
)

__all__ = ["LocalTrainResult", "train_local", "run_epochs"]

ProgressCallback = Callable[[int, float], None]


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
    accountant: str = "rdp",
    secure_mode: bool = False,
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
    ``accountant`` ("rdp" or "prv") composes ``history`` and this round into ``epsilon``;
    ``secure_mode`` draws DP noise and batches from Opacus' secure generator (torchcsprng).
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
    sample_rate, _ = planned_steps(n_records=n_records, batch_size=batch_size, epochs_per_round=epochs, rounds=1)
    sampling_generator, noise_generator = _generators(seed, device=params[0].device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampling_generator)
    optimizer = torch.optim.Adam(params, lr=lr)
    after_step = _proximal_pull(params, lr * proximal_mu) if proximal_mu > 0 else None
    was_training = model.training
    model.train()
    try:
        if private:
            with private_round(
                model,
                loader,
                optimizer,
                per_example_loss,
                params=params,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                noise_multiplicity=noise_multiplicity,
                grad_sample_mode=grad_sample_mode,
                noise_generator=noise_generator,
                max_physical_batch_size=max_physical_batch_size,
                secure_mode=secure_mode,
            ) as dp:
                loss_sum, rows, steps = run_epochs(
                    dp.batches,
                    dp.optimizer,
                    dp.backward,
                    params=params,
                    epochs=epochs,
                    after_step=after_step,
                    progress=progress,
                )
            round_entry = dp.round_entry(steps)
        else:
            backward = BatchBackward(model, per_example_loss, multiplicity=noise_multiplicity)
            loss_sum, rows, steps = run_epochs(
                loader,
                optimizer,
                backward,
                params=params,
                epochs=epochs,
                after_step=after_step,
                progress=progress,
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
        epsilon=epsilon_from_history(full_history, delta=delta, accountant=accountant),
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


def _proximal_pull(params: list[Tensor], strength: float) -> Callable[[], None]:
    start = [p.detach().clone() for p in params]

    @torch.no_grad()
    def pull() -> None:
        for p, p0 in zip(params, start, strict=True):
            p.sub_(strength * (p - p0))

    return pull


def run_epochs(
    batches: DataLoader,
    optimizer: torch.optim.Optimizer,
    backward: BatchBackward,
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
                set_empty_gradients(params)
            else:
                losses = backward(batch)
                step_loss_sum += losses.sum().item()
                step_rows += losses.numel()
            optimizer.step()
            if not was_accumulation_only(optimizer):
                steps += 1
                if after_step is not None:
                    after_step()
                if progress is not None:
                    progress(steps, step_loss_sum / step_rows if step_rows else math.nan)
                loss_sum, rows = loss_sum + step_loss_sum, rows + step_rows
                step_loss_sum, step_rows = 0.0, 0
            optimizer.zero_grad()
    return loss_sum, rows, steps


def _generators(seed: int | None, *, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
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
