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
            help="Images the consortium declares NON-sensitive: an ImageFolder with the consortium's class names (labels used) or any folder of images (unlabelled)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Folder to create for the pretrained image model; name it in image.init_checkpoint.")
    ],
    config: ConfigOption = None,
    epochs: Annotated[int, typer.Option(help="Passes over the public images.")] = PRETRAIN_DEFAULTS["epochs"],
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = PRETRAIN_DEFAULTS["batch_size"],
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = PRETRAIN_DEFAULTS["lr"],
    ema_decay: Annotated[
        float,
        typer.Option(
            help="Write the moving average of the weights over the steps with this decay (0: the last step's weights)."
        ),
    ] = PRETRAIN_DEFAULTS["ema_decay"],
    balance_classes: Annotated[
        bool,
        typer.Option(
            help="Labelled public sets: draw every class equally often (with replacement), same number of steps."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of batch order and diffusion noise.")] = 0,
) -> None:
    """Train the run's image architecture WITHOUT DP on public data, for DP fine-tuning at the sites.

    The federation starts from it when the run config sets image.init_checkpoint = OUT; set
    image.trainable to fine-tune only part of it. The model folder carries pretraining.json
    (which data, how trained, the weights' SHA-256), which the run folder and the audit report
    record. Without data.image_classes in --config the classes are the public set's class
    folders, sorted; an unlabelled (flat) public folder needs them in --config.
    """
    from fedgen.config import load_config
    from fedgen.pretrain import pretrain_image_model, public_class_names

    run_config = load_config(config)
    if "image_classes" not in run_config.data.model_fields_set and public.is_dir():
        names = public_class_names(public)
        if names is None:
            raise FedgenError(
                f"{public} has images outside class folders (unlabelled): list the consortium's "
                "data.image_classes in --config, the model needs one embedding per class"
            )
        run_config = run_config.model_copy(update={"data": run_config.data.model_copy(update={"image_classes": names})})
    record = pretrain_image_model(
        public,
        out,
        run_config,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        balance_classes=balance_classes,
        seed=seed,
        progress=True,
    )
    labels = "labelled" if record["labelled"] else "unlabelled (null class)"
    console.print(
        f"pretrained on {record['images']} {labels} public images: {record['steps']} steps in "
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
