"""How much of a DP-SGD step is signal: the text adapter's per-note gradients against the noise.

DP-SGD adds Gaussian noise of norm ~σ·C·sqrt(d) to the sum of a batch's clipped per-example
gradients (bound C, d trained parameters). That sum's norm is B times the norm of the mean
clipped gradient, which is at most B·C and shrinks with how much the notes' gradients disagree.
This measures, on one site's training notes and the adapter a federation starts from:

- each note's gradient norm (quantiles) and how many a bound C clips,
- the signal-to-noise of one step, B·|expected clipped gradient| / (σ·C·sqrt(d)), at the site's
  planned σ, q and steps, and of the whole run, times sqrt(steps) (signal adds up linearly,
  noise as the square root; with the starting gradients, so an upper bound),
- the same at sites of 4x and 16x the notes (σ recalibrated to the same ε), assuming gradients
  that agree as these do: where DP fine-tuning starts to learn.

    python -m benchmarks.dp_signal [--sites-dir SITES] [--config scripts/demo.toml] [--notes 64]
        [--train-steps 0] [--set text.lora_layers=4 ...]

Without ``--sites-dir`` it runs on the demo's first site (``fedgen demo-data --different-people``,
seed 0). ``--train-steps K`` first trains the adapter K non-DP steps on the site's notes, to see
the norms later in training.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.privacy_utility import add_config_options, parse_sets
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import load_site
from fedgen.modalities import TextModality
from fedgen.privacy.accounting import calibrate_noise_multiplier, planned_steps
from fedgen.privacy.plan import plan_privacy
from fedgen.training import train_local

QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)
SCALES = (1, 4, 16)  # site sizes, as multiples of the measured site's training notes


def per_note_gradients(task: TextModality, model, data, count: int) -> torch.Tensor:
    """[count, d]: the trained parameters' gradient of each of the first ``count`` notes' loss."""
    loss = task.per_example_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    model.train()
    for i in range(min(count, len(data))):
        model.zero_grad(set_to_none=True)
        loss(model, tuple(t[i : i + 1] for t in data.tensors)).sum().backward()
        rows.append(torch.cat([p.grad.flatten().float() for p in params]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


def step_signal(grads: torch.Tensor, bound: float) -> tuple[float, float]:
    """(norm of the expected clipped gradient, fraction of notes clipped) at bound ``bound``.

    The sample mean's squared norm overstates the expectation's by the per-note spread over n;
    (n |mean|² - mean |c_i|²) / (n - 1) is unbiased for it."""
    norms = grads.norm(dim=1)
    clipped = grads * (bound / norms).clamp(max=1.0)[:, None]
    n = len(clipped)
    squared = (n * clipped.mean(dim=0).square().sum() - clipped.square().sum(dim=1).mean()) / (n - 1)
    return math.sqrt(max(0.0, float(squared))), float((norms > bound).float().mean())


def snr(*, signal: float, bound: float, batch: float, sigma: float, d: int, steps: int) -> tuple[float, float]:
    """(one step's, the run's) signal-to-noise for an expected clipped gradient of norm ``signal``."""
    step = batch * signal / (sigma * bound * math.sqrt(d))
    return step, step * math.sqrt(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites-dir", type=Path, help="a consortium's sites (default: the demo's)")
    parser.add_argument("--notes", type=int, default=64, help="training notes whose gradients are measured")
    parser.add_argument("--train-steps", type=int, default=0, help="non-DP steps on the site's notes first")
    add_config_options(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config, {"modality": "text", **parse_sets(args.sets)})
    work = Path(tempfile.mkdtemp())
    sites_dir = args.sites_dir or work / "sites"
    if args.sites_dir is None:
        make_demo_consortium(sites_dir, sites=3, seed=0, different_people=True)
    site = load_site(sorted(sites_dir.glob("site-*"))[0], config.data, modalities=("text",))
    task = TextModality(config, work_dir=work)
    text = config.text
    model = task.build_model()
    train, _ = task.datasets(site)
    data = task.training_set(model, train)
    if args.train_steps:
        epochs = math.ceil(args.train_steps * text.batch_size / len(data))
        train_local(model, data, task.per_example_loss(), epochs=epochs, batch_size=text.batch_size, lr=text.lr,
                    noise_multiplier=None, max_grad_norm=text.max_grad_norm, delta=1e-5, seed=0)  # fmt: skip
    started = time.perf_counter()
    grads = per_note_gradients(task, model, data, args.notes)
    d, n = grads.shape[1], len(data)
    norms = torch.quantile(grads.norm(dim=1), torch.tensor(QUANTILES))
    unit = grads / grads.norm(dim=1, keepdim=True)
    print(f"{site.name}: {n} training notes, {d:,} trained parameters, {len(grads)} notes measured "
          f"in {time.perf_counter() - started:.0f} s{f' after {args.train_steps} non-DP steps' if args.train_steps else ''}")  # fmt: skip
    print("per-note gradient norm, min / 10% / median / 90% / max: " + " / ".join(f"{v:.3g}" for v in norms))
    print(f"agreement |mean unit gradient|: {float(unit.mean(dim=0).norm()):.3f} "
          f"(independent random directions: {1 / math.sqrt(len(grads)):.3f})")  # fmt: skip
    plan = plan_privacy(config, site, modality="text")
    if plan.noise_multiplier is None:
        print("no DP in this configuration: no noise to compare with")
        return
    steps = plan.steps_per_round * config.federation.rounds
    batch = plan.sample_rate * n
    print(f"plan at ε {plan.budget:g}, δ {plan.delta:.3g}: σ {plan.noise_multiplier:.3f}, q {plan.sample_rate:.3f}, "
          f"expected batch {batch:.1f}, {steps} steps")  # fmt: skip
    print("| bound C | notes clipped | signal-to-noise, one step | whole run | run at 4x / 16x the notes |")
    print("|---:|---:|---:|---:|---:|")
    for bound in dict.fromkeys((text.max_grad_norm, 1.0)):
        signal, clipped = step_signal(grads, bound)
        runs = []
        for scale in SCALES:
            q, scaled_steps = planned_steps(n_records=n * scale, batch_size=text.batch_size,
                                            epochs_per_round=text.local_epochs, rounds=config.federation.rounds)  # fmt: skip
            sigma = plan.noise_multiplier if scale == 1 else calibrate_noise_multiplier(
                target_epsilon=plan.budget, delta=plan.delta / scale, sample_rate=q, steps=scaled_steps)  # fmt: skip
            runs.append(snr(signal=signal, bound=bound, batch=q * n * scale, sigma=sigma, d=d, steps=scaled_steps))
        print(f"| {bound:g} | {clipped:.0%} | {runs[0][0]:.3f} | {runs[0][1]:.2f} | "
              f"{runs[1][1]:.2f} / {runs[2][1]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
