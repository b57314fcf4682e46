"""Federation overhead: each round's wall time against the sites' own local training time.

Reads the metrics.json of every checkpoint of a run (simulated or deployed):
    python -m benchmarks.federation_overhead RUN

Sites train in parallel (one core each in simulation), so the wall time is compared with both
the sum and the slowest of the sites' training times.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedgen.artifacts import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    args = parser.parse_args()
    run = RunDir.open(args.run)
    print(
        f"{'modality':<8} {'round':>5} {'wall s':>8} {'sum sites s':>12} {'max site s':>11} {'wall/sum':>9} {'wall/max':>9}"
    )
    for modality in run.config().modalities:
        for server_round in run.completed_rounds(modality):
            info = json.loads((run.round_dir(server_round) / modality / "metrics.json").read_text())
            sites = info.get("site_train_seconds") or {}
            if not sites:
                continue
            wall, total, slowest = info["round_seconds"], sum(sites.values()), max(sites.values())
            print(
                f"{modality:<8} {server_round:>5} {wall:>8.1f} {total:>12.1f} {slowest:>11.1f} {wall / total:>9.2f} {wall / slowest:>9.2f}"
            )


if __name__ == "__main__":
    main()
