"""The `fedgen` command line. Commands validate their input, then call plain functions.

A user mistake (FedgenError) is shown as one line on stderr with exit code 1; a command whose
capability has not landed yet says so and exits 2; anything else is a bug and stays loud.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from fedgen.errors import FedgenError

__all__ = ["app"]

err_console = Console(stderr=True)
console = Console()

EXIT_USER_ERROR = 1
EXIT_NOT_AVAILABLE = 2


class _Group(TyperGroup):
    """Turns FedgenError anywhere below into one line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FedgenError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None


app = typer.Typer(
    cls=_Group,
    help="fedgen: privacy-audited federated generation of synthetic health data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(cls=_Group, help="Inspect and validate site data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _not_yet(command: str, issue: str) -> None:
    err_console.print(f"fedgen {command}: not available yet (lands with the {issue}).")
    raise typer.Exit(EXIT_NOT_AVAILABLE)


def _parse_epsilon(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        eps = float(value)
    except ValueError:
        raise FedgenError(f"--epsilon must be a number or 'inf', got {value!r}") from None
    if not eps > 0 or math.isnan(eps):
        raise FedgenError(f"--epsilon must be positive, got {value}")
    return eps


ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run configuration (TOML); defaults are the demo's.")
]


@app.command("demo-data")
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


@data_app.command("check")
def data_check(
    site_dir: Annotated[Path, typer.Argument(help="A site folder: images/<class>/*, texts.jsonl, site.toml.")],
    config: ConfigOption = None,
) -> None:
    """Validate a site folder against the consortium's class lists and print a summary."""
    from fedgen.config import load_config
    from fedgen.data.site import check_site

    run_config = load_config(config)
    result = check_site(site_dir, run_config.data, channels=run_config.image.channels)
    console.print(result.table())
    for problem in result.problems:
        err_console.print(f"problem: {problem}", highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(EXIT_USER_ERROR)


def _site_dirs(sites_dir: Path | None, site: list[Path] | None) -> list[Path]:
    if site:
        return list(site)
    if sites_dir is None:
        return []
    if not sites_dir.is_dir():
        raise FedgenError(f"sites folder not found: {sites_dir}")
    return sorted(p for p in sites_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@app.command()
def simulate(
    sites_dir: Annotated[Path | None, typer.Option(help="Folder whose subfolders are the sites. Default: a fresh demo consortium.")] = None,
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
    """Run the consortium on one machine with simulated hospitals (Flower simulation engine)."""
    from fedgen.artifacts import RunDir
    from fedgen.config import load_config
    from simulations.runner import check_sites
    from simulations.runner import simulate as run_simulated

    sites = _site_dirs(sites_dir, site)
    overrides = {
        "modality": modality,
        "federation.rounds": rounds,
        "privacy.epsilon": _parse_epsilon(epsilon),
        "federation.sites": len(sites) or num_sites,
    }
    run_config = load_config(config, overrides)
    if sites:
        check_sites(run_config, sites)
        run = RunDir.create(runs_dir, run_config, run_id)
    else:
        from fedgen.data.demo import make_demo_consortium

        run = RunDir.create(runs_dir, run_config, run_id)
        sites = make_demo_consortium(
            run.root / "demo-sites", sites=num_sites, seed=run_config.seed, progress=True
        )
    if not run_config.privacy.enabled:
        err_console.print("[bold yellow]WARNING: ε = inf — training WITHOUT differential privacy.[/]")
    run_simulated(run, sites, verbose=verbose)
    console.print(f"run folder: {run.root}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>).")],
    modality: Annotated[str, typer.Option(help="image or text.")] = "image",
    per_class: Annotated[int, typer.Option(help="Samples per class.")] = 16,
    class_name: Annotated[list[str] | None, typer.Option("--class", help="Only this class (repeatable).")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (image).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (image).")] = None,
    round_: Annotated[int | None, typer.Option("--round", help="Checkpoint round (default: the last).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Write synthetic images (and a contact sheet) or texts from a run's checkpoint."""
    from fedgen.artifacts import RunDir
    from fedgen.generate import generate_images, generate_texts

    if per_class < 1:
        raise FedgenError(f"--per-class must be at least 1, got {per_class}")
    run = RunDir.open(run_dir)
    if modality == "image":
        out = generate_images(run, per_class=per_class, classes=class_name, steps=steps, guidance=guidance, server_round=round_, seed=seed)
    elif modality == "text":
        out = generate_texts(run, per_class=per_class, classes=class_name, server_round=round_, seed=seed)
    else:
        raise FedgenError(f"--modality must be image or text, got {modality!r}")
    console.print(f"wrote {out}")


@app.command()
def server() -> None:
    """Coordinator: start a Flower SuperLink and submit the fedgen run (TLS, node auth)."""
    _not_yet("server", "deployment issue (#6)")


@app.command()
def client() -> None:
    """Site: start a Flower SuperNode serving the fedgen ClientApp for SITE_DIR."""
    _not_yet("client", "deployment issue (#6)")


@app.command()
def certs() -> None:
    """Make a consortium CA, a server certificate and per-site node keys."""
    _not_yet("certs", "deployment issue (#6)")


@app.command()
def audit() -> None:
    """Run the pre-release audits on a run and write audit/report.{json,html}."""
    _not_yet("audit", "audits issue (#5)")


@app.command()
def release() -> None:
    """Copy synthetic data, report and a SHA-256 manifest out, only if the gate passed."""
    _not_yet("release", "audits issue (#5)")
