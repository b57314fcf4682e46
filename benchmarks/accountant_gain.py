"""What the PRV accountant buys at equal ε: the noise it calibrates against RDP's.

The same guarantee (ε at δ) over the same planned steps, σ calibrated by Opacus' RDP and by its
PRV accountant (``[privacy] accountant``), at the image federation's defaults on a small site:
320 train records, batch 64, 3 rounds x 5 local epochs, δ = 1 / (10 x 320).

    python -m benchmarks.accountant_gain [--epsilons 1 3 10] [--records 320]
"""

from __future__ import annotations

import argparse

from fedgen.config import RunConfig
from fedgen.privacy.accounting import calibrate_noise_multiplier, default_delta, planned_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--records", type=int, default=320, help="Training records of the site.")
    args = parser.parse_args()
    config = RunConfig()
    q, steps = planned_steps(
        n_records=args.records, batch_size=config.image.batch_size, epochs_per_round=config.image.local_epochs,
        rounds=config.federation.rounds,
    )  # fmt: skip
    delta = default_delta(args.records)
    print(f"{args.records} records: q = {q:g}, {steps} steps, δ = {delta:.3g}")
    for epsilon in args.epsilons:
        rdp, prv = (
            calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=q, steps=steps, accountant=a)
            for a in ("rdp", "prv")
        )
        print(f"ε = {epsilon:g}: σ RDP {rdp:.3f}, σ PRV {prv:.3f} ({100 * (prv / rdp - 1):+.1f}% noise)")


if __name__ == "__main__":
    main()
