"""`fedgen review kit` and `fedgen review score`: a blinded real-or-synthetic review, run at a site."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedgen.cli.common import console

__all__ = ["SCORES_FILE", "review_kit", "review_score"]

SCORES_FILE = "SCORES.json"


def review_kit(
    run_dir: Annotated[
        Path, typer.Argument(help="The released synthetic data (`fedgen release` output; or a run folder): read only.")
    ],
    data: Annotated[Path, typer.Option(help="This site's folder: its held-out records are the real items.")],
    out: Annotated[Path, typer.Option(help="A new folder INSIDE the site folder for the kit (it holds real records).")],
    per_class: Annotated[
        int, typer.Option(help="Real items per class, at most; each class gets as many synthetic ones.")
    ] = 10,
    modality: Annotated[
        list[str] | None, typer.Option(help="image or text (repeatable). Default: the run's modalities.")
    ] = None,
) -> None:
    """Make a blinded review kit AT A SITE: one HTML page mixing held-out real and synthetic records.

    Reviewers open KIT/review.html in a browser (no server, no network), answer real or
    synthetic, their confidence and their reading per item, and save an answers file each.
    KIT/answer-key.json says which item is real: it stays with the site's data steward.
    """
    from fedgen.audits.review_kit import build_kit

    kit = build_kit(run_dir, data, out, per_class=per_class, modalities=modality)
    for name, counts in kit.items_per_class.items():
        items = ", ".join(f"{c} {n}" for c, n in counts.items())
        console.print(
            f"{name}: {2 * sum(counts.values())} items, real and synthetic alike per class ({items})", highlight=False
        )
    console.print(f"give reviewers: {kit.page}\nkeep at the site: {kit.key}", highlight=False, soft_wrap=True)


def review_score(
    kit_dir: Annotated[Path, typer.Argument(help="The kit folder (with answer-key.json).")],
    answers: Annotated[list[Path], typer.Argument(help="The reviewers' answers files, one per reviewer.")],
    out: Annotated[Path | None, typer.Option(help=f"Where to write the scores. Default: KIT/{SCORES_FILE}.")] = None,
) -> None:
    """Score the reviewers' answers at the site; only the aggregates (SCORES.json) may leave it."""
    from rich.table import Table

    from fedgen.audits.review import score_kit
    from fedgen.files import write_json

    scores = score_kit(kit_dir, answers)
    target = out or kit_dir / SCORES_FILE
    write_json(target, scores)
    table = Table(
        "modality",
        "reviewer",
        "answers",
        "detection accuracy (95% CI)",
        "p vs 0.5",
        "synthetic read as generated",
        "real read as recorded",
    )
    for name, section in scores["modalities"].items():
        for label, figures in [*section["reviewers"].items(), ("pooled", section["pooled"])]:
            detection = figures["detection"]
            reading = figures["reading"]
            table.add_row(
                name, label, str(figures["n_answered"]), _interval(detection), _p(detection.get("p_value")),
                _interval(reading["synthetic"]), _interval(reading["real"]),
            )  # fmt: skip
    console.print(table)
    for name, section in scores["modalities"].items():
        agreement = section["agreement"]
        if agreement["method"]:
            source, reading = agreement["source"], agreement["reading"]
            console.print(
                f"{name}: {agreement['method']} on real/synthetic {_kappa(source['kappa'])} ({source['n_items']} items), "
                f"on the reading {_kappa(reading['kappa'])} ({reading['n_items']} items)",
                highlight=False,
            )
    for path, label in zip(answers, (f"reviewer {n}" for n in range(1, len(answers) + 1))):
        console.print(f"{label}: {path}", highlight=False, soft_wrap=True)
    console.print(f"scores (aggregates only, for the coordinator): {target}", highlight=False, soft_wrap=True)


def _interval(share: dict) -> str:
    if share["value"] is None:
        return "-"
    low, high = share["ci"]
    return f"{share['value']:.2f} ({low:.2f}-{high:.2f})"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _kappa(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"
