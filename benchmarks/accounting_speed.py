"""What RDP accounting costs: one RDP curve and one σ calibration, fedgen against Opacus alone.

fedgen sums Opacus' RDP terms with numpy (fedgen.privacy.accounting.rdp_per_step); Opacus loops
over them in Python. Per sample rate q: CPU seconds for the RDP curve of one (σ, q) at every
order of Opacus' RDPAccountant, the largest relative difference between the two curves, and the
CPU seconds to calibrate σ for ε at δ over the planned steps (Opacus' get_noise_multiplier
against fedgen's calibrate_noise_multiplier), with the ε each σ gives by Opacus' own accountant.

    python -m benchmarks.accounting_speed [--epsilon 10] [--steps 30] [--delta 1e-4]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedgen.privacy.accounting import calibrate_noise_multiplier, rdp_per_step

SAMPLE_RATES = (0.01, 0.1, 0.25, 0.5)
SIGMAS = (0.7, 3.0, 20.0)


def cpu_seconds(work) -> tuple[float, object]:
    start = time.process_time()
    result = work()
    return time.process_time() - start, result


def opacus_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta=delta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=30, help="Planned DP-SGD steps of the site.")
    parser.add_argument("--delta", type=float, default=1e-4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # the bound holds
    orders = RDPAccountant.DEFAULT_ALPHAS
    print(f"RDP curve at {len(orders)} orders (CPU s, Opacus / fedgen, largest relative difference):")
    for q in SAMPLE_RATES:
        for sigma in SIGMAS:
            rdp_per_step.cache_clear()
            opacus_s, expected = cpu_seconds(lambda: compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
            fedgen_s, ours = cpu_seconds(lambda: rdp_per_step(sigma, q))
            difference = float(np.max(np.abs(ours - expected) / np.abs(expected)))
            print(f"  q={q:<5g} σ={sigma:<5g} {opacus_s:7.3f} / {fedgen_s:.3f}  {difference:.1e}")
    print(f"σ for ε={args.epsilon:g} at δ={args.delta:g} over {args.steps} steps (CPU s; ε by Opacus' accountant):")
    for q in SAMPLE_RATES:
        opacus_s, opacus_sigma = cpu_seconds(
            lambda: get_noise_multiplier(
                target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=q, steps=args.steps,
                accountant="rdp", epsilon_tolerance=0.005 * args.epsilon,
            )
        )  # fmt: skip
        fedgen_s, sigma = cpu_seconds(
            lambda: calibrate_noise_multiplier(
                target_epsilon=args.epsilon, delta=args.delta, sample_rate=q, steps=args.steps
            )
        )
        print(
            f"  q={q:<5g} Opacus {opacus_s:6.2f} s (σ {opacus_sigma:.4f}, ε {opacus_epsilon(opacus_sigma, q, args.steps, args.delta):.3f})"
            f"  fedgen {fedgen_s:5.2f} s (σ {sigma:.4f}, ε {opacus_epsilon(sigma, q, args.steps, args.delta):.3f})"
        )


if __name__ == "__main__":
    main()
