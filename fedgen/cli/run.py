"""`fedgen pretrain`, `fedgen simulate`, `fedgen generate` and `fedgen ledger`: training, sampling
and the privacy ledger of a run, on one machine."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from fedgen.cli.common import ConfigOption, console, err_console, parse_epsilon
from fedgen.config import PRETRAIN_DEFAULTS
from fedgen.errors import FedgenError

__all__ = ["pretrain", "simulate", "generate", "ledger"]

DEMO_SITES = "demo-sites"  # where `fedgen simulate` without sites puts its fresh demo consortium


def pretrain(
    public: Annotated[
        Path,
        typer.Option(
            help="Data the consortium declares NON-sensitive. Images: an ImageFolder with the consortium's class names (labels used) or any folder of images (unlabelled). Text: a folder with texts.jsonl, as a site's."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Folder to create for the pretrained model; name it in image.init_checkpoint or text.init_adapter."
        ),
    ],
    config: ConfigOption = None,
    modality: Annotated[str, typer.Option(help="image (the diffusion model) or text (the LoRA adapter).")] = "image",
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the public data (default: image 30, text 3).", show_default=False)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Records per step (default: image 32, text 16).", show_default=False)
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default: 2e-3).", show_default=False)] = None,
    ema_decay: Annotated[
        float | None,
        typer.Option(
            help="Images: write the moving average of the weights over the steps with this decay (default 0.999; 0: the last step's weights).",
            show_default=False,
        ),
    ] = None,
    balance_classes: Annotated[
        bool,
        typer.Option(
            help="Labelled public images: draw every class equally often (with replacement), same number of steps."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of batch order (and of the diffusion noise).")] = 0,
) -> None:
    """Train a model WITHOUT DP on public data, for DP fine-tuning at the sites.

    Images: the run's image architecture; the federation starts from it when the run config sets
    image.init_checkpoint = OUT (image.trainable fine-tunes part of it). Without
    data.image_classes in --config the classes are the public set's class folders, sorted; an
    unlabelled (flat) public folder needs them in --config. Text: the run's LoRA adapter on its
    base model, on notes labelled with the run's text classes; the federation starts from it
    when the run config sets text.init_adapter = OUT. The model folder carries pretraining.json
    (which data, how trained, the weights' SHA-256), which the run folder and the audit report
    record.
    """
    from fedgen.config import load_config
    from fedgen.logs import quiet_libraries

    if modality not in PRETRAIN_DEFAULTS:
        raise FedgenError(f"--modality {modality!r}: choose image or text")
    defaults = PRETRAIN_DEFAULTS[modality]
    schedule = {
        "epochs": defaults["epochs"] if epochs is None else epochs,
        "batch_size": defaults["batch_size"] if batch_size is None else batch_size,
        "lr": defaults["lr"] if lr is None else lr,
        "seed": seed,
        "progress": True,
    }
    run_config = load_config(config)
    quiet_libraries()
    if modality == "text":
        if ema_decay is not None or balance_classes:
            raise FedgenError("--ema-decay and --balance-classes are for images")
        _pretrain_text(public, out, run_config, schedule)
    else:
        ema = defaults["ema_decay"] if ema_decay is None else ema_decay
        _pretrain_image(public, out, run_config, {**schedule, "ema_decay": ema, "balance_classes": balance_classes})


def _pretrain_image(public: Path, out: Path, run_config, schedule: dict) -> None:
    from fedgen.pretrain import pretrain_image_model, public_class_names

    if "image_classes" not in run_config.data.model_fields_set and public.is_dir():
        names = public_class_names(public)
        if names is None:
            raise FedgenError(
                f"{public} has images outside class folders (unlabelled): list the consortium's "
                "data.image_classes in --config, the model needs one embedding per class"
            )
        run_config = run_config.model_copy(update={"data": run_config.data.model_copy(update={"image_classes": names})})
    record = pretrain_image_model(public, out, run_config, **schedule)
    labels = "labelled" if record["labelled"] else "unlabelled (null class)"
    console.print(
        f"pretrained on {record['images']} {labels} public images: {record['steps']} steps in "
        f"{record['seconds']:.0f} s, loss {record['final_mean_loss']:.4f} -> {out}"
    )


def _pretrain_text(public: Path, out: Path, run_config, schedule: dict) -> None:
    from fedgen.data.check import classes_from_sites
    from fedgen.pretrain import pretrain_text_adapter

    run_config = classes_from_sites(run_config, [public], modalities=["text"])
    record = pretrain_text_adapter(public, out, run_config, **schedule)
    console.print(
        f"pretrained the text adapter on {record['notes']} public notes: {record['steps']} steps in "
        f"{record['seconds']:.0f} s, loss {record['final_mean_loss']:.4f} -> {out}"
    )


def _site_dirs(sites_dir: Path | None, site: list[Path] | None) -> list[Path]:
    if site:
        return list(site)
    if sites_dir is None:
        return []
    if not sites_dir.is_dir():
        raise FedgenError(f"sites folder not found: {sites_dir}")
    from fedgen.data.check import site_folders

    return site_folders(sites_dir)


def simulate(
    sites_dir: Annotated[
        Path | None, typer.Option(help="Folder whose subfolders are the sites. Default: a fresh demo consortium.")
    ] = None,
    site: Annotated[list[Path] | None, typer.Option(help="A site folder (repeatable); overrides --sites-dir.")] = None,
    config: ConfigOption = None,
    modality: Annotated[str | None, typer.Option(help="image, text or both.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    epsilon: Annotated[str | None, typer.Option(help="Target ε per site for the run; 'inf' = no DP.")] = None,
    num_sites: Annotated[int, typer.Option(help="Sites of the fresh demo consortium.")] = 3,
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are created.")] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Run folder name (default: a timestamp).")] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run the consortium on one machine with simulated hospitals (Flower simulation engine).

    Class lists the configuration leaves out are the sorted union of the sites' class folders
    and text labels, recorded in the run's config.toml.
    """
    from fedgen.cli.site_watch import showing_site_progress
    from fedgen.config import load_config
    from fedgen.data.check import classes_from_sites
    from fedgen.logs import quiet_libraries
    from fedgen.pretrain import create_run
    from fedgen.simulations.engine import check_sites
    from fedgen.simulations.engine import simulate as run_simulated

    if not verbose:
        quiet_libraries()  # before the sites are checked: that loads the text base model
    sites = _site_dirs(sites_dir, site)
    overrides = {
        "modality": modality,
        "federation.rounds": rounds,
        "privacy.epsilon": parse_epsilon(epsilon),
        "federation.sites": len(sites) or num_sites,
    }
    run_config = load_config(config, overrides)
    if sites:
        run_config = classes_from_sites(run_config, sites)
        check_sites(run_config, sites)
        run = create_run(runs_dir, run_config, run_id)
    else:  # a fresh demo consortium, made first so that its classes are the run's
        from fedgen.data.demo import make_demo_consortium

        runs_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".demo-sites-", dir=runs_dir))
        try:
            made = make_demo_consortium(staging / "sites", sites=num_sites, seed=run_config.seed, progress=True)
            run_config = classes_from_sites(run_config, made)
            run = create_run(runs_dir, run_config, run_id)
            os.replace(staging / "sites", run.root / DEMO_SITES)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        sites = [run.root / DEMO_SITES / path.name for path in made]
    if not run_config.privacy.enabled:
        err_console.print("[bold yellow]WARNING: ε = inf — training WITHOUT differential privacy.[/]")
    with showing_site_progress(sites, run_config.modalities, console):
        run_simulated(run, sites, verbose=verbose)
    console.print(f"run folder: {run.root}")
    console.print(f"privacy ledger, ε recomputed from its rows: fedgen ledger {run.root}")


def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>).")],
    modality: Annotated[str, typer.Option(help="image or text.")] = "image",
    per_class: Annotated[int, typer.Option(help="Samples per class.")] = 16,
    class_name: Annotated[list[str] | None, typer.Option("--class", help="Only this class (repeatable).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (image).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (image).")] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="ddpm (ancestral), dpm-sde (stochastic DPM-Solver++), ddim or dpm (image; default: the run's image.sampler)."
        ),
    ] = None,
    round_: Annotated[int | None, typer.Option("--round", help="Checkpoint round (default: the last).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Write synthetic images (and a contact sheet) or texts from a run's checkpoint."""
    from fedgen.artifacts import RunDir
    from fedgen.generate import generate_images, generate_texts
    from fedgen.logs import quiet_libraries

    if per_class < 1:
        raise FedgenError(f"--per-class must be at least 1, got {per_class}")
    run = RunDir.open(run_dir)
    quiet_libraries()
    if modality == "image":
        out = generate_images(
            run,
            per_class=per_class,
            classes=class_name,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            server_round=round_,
            seed=seed,
        )
    elif modality == "text":
        out = generate_texts(run, per_class=per_class, classes=class_name, server_round=round_, seed=seed)
    else:
        raise FedgenError(f"--modality must be image or text, got {modality!r}")
    console.print(f"wrote {out}")


def ledger(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A run folder (runs/<run-id>), or a ledger.sqlite (a site's own: SITE_DIR/.fedgen/runs/*/ledger.sqlite)."
        ),
    ],
) -> None:
    """Each site's ε as recorded and as recomputed from the ledger's (σ, q, steps) rows alone,
    and the Python that recomputes it with Opacus without fedgen."""
    from fedgen.artifacts import RunDir
    from fedgen.privacy.ledger import PrivacyLedger, recompute_site_epsilon, recompute_snippet
    from fedgen.privacy.plan import SAME_PEOPLE

    path = run_dir if run_dir.is_file() else RunDir.open(run_dir).ledger_path
    book = PrivacyLedger(path)
    sites = {site: book.entries(site=site) for site in book.sites()}
    if not sites:
        raise FedgenError(f"{path} holds no update yet")
    typer.echo(f"{path}: one row per update a site released (lost = its reply never arrived)")
    typer.echo(
        f"{'site':<14}{'updates':>8}{'lost':>6}  {'accountant':<11}{'records of the models':<23}{'δ':<10}{'recorded ε':>11}{'recomputed ε':>14}"
    )
    for site, rows in sites.items():
        reported = [r for r in rows if not r.lost]
        recorded = f"{reported[-1].site_epsilon:.4f}" if reported else "none"
        typer.echo(
            f"{site:<14}{len(rows):>8}{sum(r.lost for r in rows):>6}  {rows[-1].accountant:<11}{rows[-1].composition:<23}"
            f"{rows[-1].delta:<10.3g}{recorded:>11}{recompute_site_epsilon(rows):>14.4f}"
        )
    site, rows = next(iter(sites.items()))
    typer.echo(
        f"\nRecompute a site's ε with Opacus alone ({SAME_PEOPLE}: every row of the site in one accountant; "
        "different people: one accountant per modality, the largest ε), e.g. for " + site + ":"
    )
    typer.echo(recompute_snippet(path.resolve(), site, delta=rows[-1].delta, accountant=rows[-1].accountant))
