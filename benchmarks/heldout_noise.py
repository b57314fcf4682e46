"""Is a text attack's TPR at 1% FPR a leak or the noise of a small held-out set?

The audit measures the attacks against the sites' held-out notes (about 40 a site on the demo):
its "1% FPR" threshold is the second-highest held-out score of 123. This scores the same
training notes (members) against FRESH notes that the same generator writes for each site and
the model never saw, many more of them, so the threshold's FPR is close to 1%: members against
held-out (what the audit measures), members against fresh, and held-out against fresh (no
membership on either side: any figure there is noise).

    python -m benchmarks.heldout_noise RUN SITES_DIR [--fresh-per-site 400]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import beta

from fedgen.artifacts import RunDir
from fedgen.audits.mia import FPR_LEVEL_1PCT, allowed_false_positives, attack_metrics, text_attack_scores
from fedgen.clients.text_audit import TEXT_ATTACKS, text_member_scores, text_note_logprobs
from fedgen.data.check import site_folders
from fedgen.data.notes import make_site_notes
from fedgen.data.site import load_site
from fedgen.modalities import get_modality
from fedgen.models.text import encode_examples

FRESH_SEED = 5000  # any seed the demo sites do not use for their notes
PHI_FRACTION = 0.3  # as `fedgen demo-data`


def clopper_pearson(found: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    alpha = 1 - confidence
    low = beta.ppf(alpha / 2, found, n - found + 1) if found else 0.0
    high = beta.ppf(1 - alpha / 2, found + 1, n - found) if found < n else 1.0
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("sites", type=Path, help="the demo sites the run trained on (fedgen demo-data)")
    parser.add_argument("--fresh-per-site", type=int, default=400)
    args = parser.parse_args()

    run = RunDir.open(args.run)
    config = run.config()
    modality = get_modality("text", config, work_dir=run.base_models)
    model = modality.load(run.checkpoint("text", None))
    sides: dict[str, list[list[np.ndarray]]] = {name: [[], [], []] for name in TEXT_ATTACKS}
    for number, folder in enumerate(site_folders(args.sites)):
        site = load_site(folder, config.data, modalities=("text",))
        scores = text_member_scores(modality, site, model)
        rng = np.random.default_rng(FRESH_SEED + number)
        labels = [config.data.text_classes[i] for i in rng.choice(site.text_labels, args.fresh_per_site)]
        notes = [(note.label, note.text) for note in make_site_notes(labels, rng, phi_fraction=PHI_FRACTION)]
        dataset = encode_examples(
            modality.tokenizer(), notes, template=config.text.prompt_template, max_length=config.text.max_length
        )
        fresh = text_attack_scores(text_note_logprobs(model, dataset), [text for _, text in notes])
        for name in TEXT_ATTACKS:
            for side, values in zip(sides[name], (*scores[name], fresh[name])):
                side.append(values)
    for name in TEXT_ATTACKS:
        members, heldout, fresh = (np.concatenate(side) for side in sides[name])
        against_heldout, against_fresh = attack_metrics(members, heldout), attack_metrics(members, fresh)
        found = round(against_fresh.tpr_at_1pct_fpr * len(members))
        low, high = clopper_pearson(found, len(members))
        threshold = np.sort(heldout)[-(allowed_false_positives(len(heldout), FPR_LEVEL_1PCT) + 1)]
        print(
            f"{name}: members {len(members)}, held-out {len(heldout)}, fresh {len(fresh)}\n"
            f"  against held-out: AUC {against_heldout.auc:.3f}, TPR at 1% FPR {against_heldout.tpr_at_1pct_fpr:.3f}"
            f" (its threshold accuses {np.mean(fresh > threshold):.1%} of the fresh notes)\n"
            f"  against fresh:    AUC {against_fresh.auc:.3f}, TPR at 1% FPR {against_fresh.tpr_at_1pct_fpr:.3f}"
            f" ({found}/{len(members)}, Clopper-Pearson 95% {low:.3f}-{high:.3f})\n"
            f"  held-out against fresh: AUC {attack_metrics(heldout, fresh).auc:.3f}, TPR at 1% FPR {attack_metrics(heldout, fresh).tpr_at_1pct_fpr:.3f}"
        )


if __name__ == "__main__":
    main()
