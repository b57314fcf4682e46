"""A labelled image consortium fedgen was never tuned on: scikit-learn's handwritten digits
(1,797 scans of 8x8 pixels, 10 classes, shipped inside scikit-learn, nothing downloaded),
upscaled to 32x32 grayscale PNGs and dealt to sites non-IID (each class split over the sites by a
Dirichlet draw), as site folders `fedgen data check` and `fedgen simulate` read.

    python -m benchmarks.digit_sites OUT [--sites 3] [--alpha 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from fedgen.errors import FedgenError

SIZE = 32
DIGITS_MAX = 16  # load_digits' pixel values run 0..16


def deal(labels: np.ndarray, sites: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Indices of each site's records: every class's records shuffled and cut in Dirichlet(alpha) shares."""
    rng = np.random.default_rng(seed)
    dealt: list[list[int]] = [[] for _ in range(sites)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * sites))[:-1] * len(members)).astype(int)
        for site, part in enumerate(np.split(members, cuts)):
            dealt[site] += part.tolist()
    return [np.array(sorted(part)) for part in dealt]


def write_sites(out: Path, *, sites: int, alpha: float, seed: int) -> list[int]:
    if out.exists() and any(out.iterdir()):
        raise FedgenError(f"{out} is not empty")
    digits = load_digits()
    sizes = []
    for number, indices in enumerate(deal(digits.target, sites, alpha, seed), start=1):
        root = out / f"site-{number}"
        root.mkdir(parents=True)
        (root / "site.toml").write_text(f'name = "site-{number}"\n', encoding="utf-8")
        for index in indices:
            pixels = (digits.images[index] * (255 / DIGITS_MAX)).astype(np.uint8)
            folder = root / "images" / f"digit-{digits.target[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").resize((SIZE, SIZE), Image.BICUBIC).save(folder / f"{index:04d}.png")
        sizes.append(len(indices))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (smaller: less IID)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        sizes = write_sites(args.out, sites=args.sites, alpha=args.alpha, seed=args.seed)
    except FedgenError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {len(sizes)} digit sites to {args.out}: {', '.join(map(str, sizes))} images")


if __name__ == "__main__":
    main()
