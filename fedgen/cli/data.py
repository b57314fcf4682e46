"""`fedgen demo-data`, `fedgen demo-public` and `fedgen data check`: making and checking site data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rich.table import Table

from fedgen.cli.common import EXIT_USER_ERROR, ConfigOption, console, err_console
from fedgen.data.check import SiteCheck

__all__ = ["demo_data", "demo_public", "data_check"]


def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to create; gets site-1 .. site-N.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    images_per_site: Annotated[int, typer.Option(help="Fundus phantoms per site.")] = 300,
    texts_per_site: Annotated[int, typer.Option(help="Assessment notes per site.")] = 200,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration of class mix (small = non-IID).")] = 1.0,
    phi_fraction: Annotated[float, typer.Option(help="Fraction of notes with planted PHI.")] = 0.3,
    canaries: Annotated[int, typer.Option(help="Canary records (unique fake patients) per site.")] = 1,
    resolution: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
) -> None:
    """Generate a demo consortium: retinal phantoms + mental-health notes with planted PHI."""
    from fedgen.data.demo import make_demo_consortium

    paths = make_demo_consortium(
        out,
        sites=sites,
        seed=seed,
        images_per_site=images_per_site,
        texts_per_site=texts_per_site,
        alpha=alpha,
        phi_fraction=phi_fraction,
        canaries_per_site=canaries,
        resolution=resolution,
        progress=True,
    )
    console.print(f"wrote {len(paths)} sites to {out}")


def demo_public(
    out: Annotated[Path, typer.Argument(help="Folder to create: a flat folder of PNGs, or one folder per grade with --labelled.")],
    images: Annotated[int, typer.Option(help="Number of public phantoms.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed (the demo sites use 0).")] = 1000,
    resolution: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    labelled: Annotated[bool, typer.Option(help="Write an ImageFolder (one folder per grade), as a public graded set would be.")] = False,
) -> None:
    """Generate a PUBLIC image set for `fedgen pretrain`: phantoms of another population
    (mostly healthy eyes) from many cameras, unlike any demo site; unlabelled by default."""
    from fedgen.data.demo import make_public_phantoms

    make_public_phantoms(out, images=images, seed=seed, resolution=resolution, labelled=labelled, progress=True)
    console.print(f"wrote {images} {'labelled' if labelled else 'unlabelled'} public phantoms to {out}")


def data_check(
    site_dir: Annotated[Path, typer.Argument(help="A site folder: images/<class>/*, texts.jsonl, site.toml.")],
    config: ConfigOption = None,
) -> None:
    """Validate a site folder against the consortium's class lists and print a summary."""
    from fedgen.config import load_config
    from fedgen.data.check import check_site

    run_config = load_config(config)
    result = check_site(site_dir, run_config.data, channels=run_config.image.channels)
    if site_dir.is_dir():  # a missing folder has nothing to summarise
        console.print(site_table(result))
    for problem in result.problems:
        err_console.print(f"problem: {problem}", highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(EXIT_USER_ERROR)


def site_table(check: SiteCheck) -> Table:
    """Records per class and modality, image sizes and kinds, text lengths."""
    status = f"{len(check.problems)} problem(s)" if check.problems else "no problems"
    table = Table(title=f"Site {check.name}", caption=f"{check.root}: {status}")
    table.add_column("modality")
    table.add_column("class")
    table.add_column("records", justify="right")
    if "image" in check.modalities:
        details = {"sizes (WxH)": _size_summary(check), "kinds": _kind_summary(check)}
        _add_modality_rows(table, "image", check.image_counts, details)
    if "text" in check.modalities:
        details = {"length (chars)": _length_summary(check)}
        _add_modality_rows(table, "text", check.text_counts, details)
    return table


def _size_summary(check: SiteCheck) -> str:
    if check.image_size_min is None or check.image_size_max is None:
        return "-"
    return f"{_wxh(check.image_size_min)} (min) to {_wxh(check.image_size_max)} (max)"


def _kind_summary(check: SiteCheck) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in check.image_kinds.items() if n) or "-"


def _length_summary(check: SiteCheck) -> str:
    if check.text_lengths is None:
        return "-"
    low, median, high = check.text_lengths
    return f"{low} / {median:g} / {high} (min / median / max)"


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _add_modality_rows(table: Table, modality: str, counts: dict[str, int], details: dict[str, str]) -> None:
    for row, (name, n) in enumerate(counts.items()):
        table.add_row(modality if row == 0 else "", name, str(n))
    table.add_row("", "total", str(sum(counts.values())))
    for what, value in details.items():
        table.add_row("", what, value)
    table.rows[-1].end_section = True
