"""`fedgen demo-data`, `fedgen demo-public`, `fedgen data check` and `fedgen data heldout`: making and
checking site data, and listing what a site holds out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedgen.cli.common import EXIT_USER_ERROR, ConfigOption, console, err_console
from fedgen.data.check import TEXTS_FILE, SiteCheck
from fedgen.errors import FedgenError

__all__ = ["demo_data", "demo_public", "data_check", "data_heldout"]


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
    different_people: Annotated[
        bool,
        typer.Option(
            help="Declare in each site.toml that its images and notes are of different people (true of the "
            "demo's records, which share no patient), so each model may spend the site's whole ε budget."
        ),
    ] = False,
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
        different_people=different_people,
        progress=True,
    )
    console.print(f"wrote {len(paths)} sites to {out}")


def demo_public(
    out: Annotated[
        Path,
        typer.Argument(
            help="Folder to create: a flat folder of PNGs, one folder per grade with --labelled, or texts.jsonl with --notes."
        ),
    ],
    images: Annotated[int, typer.Option(help="Number of public phantoms.")] = 3000,
    notes: Annotated[
        int,
        typer.Option(
            help="Write this many public teaching-case notes (texts.jsonl, labelled) instead of images.",
            show_default=False,
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Random seed (the demo sites use 0).")] = 1000,
    resolution: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    labelled: Annotated[
        bool, typer.Option(help="Write an ImageFolder (one folder per grade), as a public graded set would be.")
    ] = False,
) -> None:
    """Generate a PUBLIC data set for `fedgen pretrain`. Images: phantoms of another population
    (mostly healthy eyes) from many cameras, unlike any demo site; unlabelled by default. Notes
    (--notes N): teaching-case vignettes of the five assessment classes, written apart from the
    demo sites' notes and free of PHI."""
    from fedgen.data.demo import make_public_note_folder, make_public_phantoms

    if notes < 0:
        raise FedgenError(f"--notes {notes}: give a positive number of notes")
    if notes:
        make_public_note_folder(out, notes=notes, seed=seed)
        console.print(f"wrote {notes} public notes to {out / 'texts.jsonl'}")
        return

    make_public_phantoms(out, images=images, seed=seed, resolution=resolution, labelled=labelled, progress=True)
    console.print(f"wrote {images} {'labelled' if labelled else 'unlabelled'} public phantoms to {out}")


def _composition_line(different_people: bool) -> str:
    """How the site's budget covers its two models, as its site.toml decides, in the ledger's words."""
    from fedgen.privacy.plan import DIFFERENT_PEOPLE, SAME_PEOPLE

    if different_people:
        return f"images and notes: {DIFFERENT_PEOPLE} (site.toml): each model may spend the whole ε budget"
    return (
        f"images and notes: taken to be the {SAME_PEOPLE}: both models share one ε budget "
        "(different_people = true in site.toml if no patient is in both)"
    )


def data_check(
    site_dir: Annotated[Path, typer.Argument(help="A site folder: images/<class>/*, texts.jsonl, site.toml.")],
    config: ConfigOption = None,
) -> None:
    """Validate a site folder against the consortium's class lists and print a summary.

    Class lists the configuration leaves out are the site's own (its class folders and text
    labels, sorted), as a consortium of this site alone would use. A held-out split too small
    for a figure the release policy needs is a warning (the check still passes).
    """
    from fedgen.audits.sample_sizes import site_heldout_warnings
    from fedgen.config import load_config
    from fedgen.data.check import CLASS_LISTS, classes_from_sites, scan_site, site_class_names
    from fedgen.data.site import heldout_size

    given = load_config(config)
    found = [m for m, names in site_class_names(site_dir).items() if names]
    run_config = classes_from_sites(given, [site_dir], modalities=found)
    scan = scan_site(site_dir, run_config.data, modalities=("image", "text"), channels=run_config.image.channels)
    result = scan.check
    if site_dir.is_dir():  # a missing folder has nothing to summarise
        console.print(site_table(result))
        fraction = scan.settings.get("heldout_fraction", run_config.data.heldout_fraction)
        for modality in found:
            field = CLASS_LISTS[modality]
            source = "the configuration" if field in given.data.model_fields_set else "this site's folders"
            names = ", ".join(getattr(run_config.data, field))
            console.print(f"{modality} classes (from {source}): {names}", highlight=False, soft_wrap=True)
            counts = result.image_counts if modality == "image" else result.text_counts
            heldout = {name: heldout_size(n, fraction) for name, n in counts.items()}
            for warning in site_heldout_warnings(modality, heldout, site=result.name):
                err_console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
        if len(found) > 1:
            console.print(_composition_line(scan.different_people), highlight=False, soft_wrap=True)
    for problem in result.problems:
        err_console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(EXIT_USER_ERROR)


def data_heldout(
    site_dir: Annotated[Path, typer.Argument(help="A site folder.")],
    run: Annotated[
        Path | None,
        typer.Option(help="A run folder: list what that run held out (its classes, split seed and fraction)."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """List the site's held-out records: the ones the audit scores as non-members, never trained on.

    One line per record on stdout (an image file, or a line number of texts.jsonl). The split
    depends on the consortium's class lists: give --run to list exactly what a run held out.
    """
    from fedgen.config import load_config
    from fedgen.data.check import classes_from_sites, site_class_names
    from fedgen.data.site import heldout_records, load_site

    if run is not None and config is not None:
        raise FedgenError("--run uses the run's own config.toml; drop --config")
    if run is not None:
        from fedgen.artifacts import RunDir

        run_config = RunDir.open(run).config()
        modalities = run_config.modalities
    else:
        modalities = [m for m, names in site_class_names(site_dir).items() if names]
        run_config = classes_from_sites(load_config(config), [site_dir], modalities=modalities)
    site = load_site(site_dir, run_config.data, modalities=modalities, channels=run_config.image.channels)
    held = heldout_records(site, seed=run_config.data.split_seed)
    for path in held["image"]:
        console.print(f"image  {path.relative_to(site.root).as_posix()}", highlight=False, soft_wrap=True)
    for line in held["text"]:
        console.print(f"text   {TEXTS_FILE} line {line}", highlight=False, soft_wrap=True)
    counts = [
        f"{len(held[m])} of {len(site.image_paths if m == 'image' else site.texts)} {m} records" for m in modalities
    ]
    err_console.print(
        f"{site.name} holds out {' and '.join(counts)} (fraction {site.heldout_fraction:g}, split seed "
        f"{run_config.data.split_seed}{'' if run is not None else '; a consortium of more sites may split otherwise: give --run RUN'})",
        highlight=False,
        soft_wrap=True,
    )


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
