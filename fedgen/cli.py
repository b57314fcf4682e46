"""The `fedgen` command line. Commands validate their input, then call plain functions.

A user mistake (FedgenError) is shown as one line on stderr with exit code 1; anything else is
a bug and stays loud.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from fedgen.config import PRETRAIN_DEFAULTS
from fedgen.errors import FedgenError

__all__ = ["app"]

err_console = Console(stderr=True)
console = Console()

EXIT_USER_ERROR = 1


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


@app.command("demo-public")
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


@app.command()
def pretrain(
    public: Annotated[Path, typer.Option(help="Images the consortium declares NON-sensitive: an ImageFolder with the consortium's class names (labels used) or any folder of images (unlabelled).")],
    out: Annotated[Path, typer.Option(help="Folder to create for the pretrained image model; name it in image.init_checkpoint.")],
    config: ConfigOption = None,
    epochs: Annotated[int, typer.Option(help="Passes over the public images.")] = PRETRAIN_DEFAULTS["epochs"],
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = PRETRAIN_DEFAULTS["batch_size"],
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = PRETRAIN_DEFAULTS["lr"],
    ema_decay: Annotated[float, typer.Option(help="Write the moving average of the weights over the steps with this decay (0: the last step's weights).")] = PRETRAIN_DEFAULTS["ema_decay"],
    balance_classes: Annotated[bool, typer.Option(help="Labelled public sets: draw every class equally often (with replacement), same number of steps.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of batch order and diffusion noise.")] = 0,
) -> None:
    """Train the run's image architecture WITHOUT DP on public data, for DP fine-tuning at the sites.

    The federation starts from it when the run config sets image.init_checkpoint = OUT; set
    image.trainable to fine-tune only part of it. The model folder carries pretraining.json
    (which data, how trained), which the run folder and the audit report record.
    """
    from fedgen.config import load_config
    from fedgen.pretrain import pretrain_image_model

    run_config = load_config(config)
    record = pretrain_image_model(public, out, run_config, epochs=epochs, batch_size=batch_size, lr=lr, ema_decay=ema_decay, balance_classes=balance_classes, seed=seed, progress=True)
    labels = "labelled" if record["labelled"] else "unlabelled (null class)"
    console.print(
        f"pretrained on {record['images']} {labels} public images: {record['steps']} steps in "
        f"{record['seconds']:.0f} s, loss {record['final_mean_loss']:.4f} -> {out}"
    )


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
    if site_dir.is_dir():  # a missing folder has nothing to summarise
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
    from fedgen.data.site import site_folders

    return site_folders(sites_dir)


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
    from fedgen.config import load_config
    from fedgen.pretrain import create_run
    from fedgen.logs import quiet_libraries
    from fedgen.simulations.runner import check_sites
    from fedgen.simulations.runner import simulate as run_simulated

    if not verbose:
        quiet_libraries()  # before the sites are checked: that loads the text base model
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
        run = create_run(runs_dir, run_config, run_id)
    else:
        from fedgen.data.demo import make_demo_consortium

        run = create_run(runs_dir, run_config, run_id)
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
    sampler: Annotated[str | None, typer.Option(help="ddpm (ancestral), dpm-sde (stochastic DPM-Solver++), ddim or dpm (image; default: the run's image.sampler).")] = None,
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
        out = generate_images(run, per_class=per_class, classes=class_name, steps=steps, guidance=guidance, sampler=sampler, server_round=round_, seed=seed)
    elif modality == "text":
        out = generate_texts(run, per_class=per_class, classes=class_name, server_round=round_, seed=seed)
    else:
        raise FedgenError(f"--modality must be image or text, got {modality!r}")
    console.print(f"wrote {out}")


def _echo(line: str) -> None:
    """Pass a Flower process's output line through, unwrapped and unstyled."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


INSECURE_WARNING = (
    "[bold red]WARNING: --insecure: no TLS and no node authentication. Model updates travel in "
    "clear text and ANY machine that reaches the port can join as a site. Use it only for a "
    "local test.[/]"
)


def _consortium(certs_dir: Path | None, insecure: bool):
    """The coordinator's credentials from --certs, or None for an explicit --insecure."""
    from fedgen.certs import load_certs

    if insecure == (certs_dir is not None):
        raise FedgenError("give --certs DIR (from `fedgen certs`), or --insecure for a local test")
    return load_certs(certs_dir) if certs_dir is not None else None


@app.command()
def server(
    config: ConfigOption = None,
    certs_dir: Annotated[Path | None, typer.Option("--certs", help="Credentials folder from `fedgen certs` (ca.crt, server.crt, server.key, authorized-keys).")] = None,
    port: Annotated[int, typer.Option(help="Port of the SuperLink (sites connect to HOST:PORT).")] = 9092,
    host: Annotated[str, typer.Option(help="0.0.0.0 serves the sites (only the Fleet API is served to other hosts); 127.0.0.1 keeps it on this machine.")] = "0.0.0.0",
    runs_dir: Annotated[Path, typer.Option(help="Where run folders are created.")] = Path("runs"),
    run_id: Annotated[str | None, typer.Option(help="Run folder name (default: a timestamp).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its last complete round.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")] = False,
) -> None:
    """Coordinator: start a Flower SuperLink and submit the fedgen run (TLS, node auth)."""
    from fedgen.artifacts import RunDir
    from fedgen.config import load_config
    from fedgen.server.deploy import check_listen_address, serve

    if resume is not None and (config is not None or run_id is not None):
        raise FedgenError("--resume continues a run with its own config.toml; drop --config and --run-id")
    consortium = _consortium(certs_dir, insecure)
    check_listen_address(host, port)
    if resume is not None:
        run = RunDir.open(resume)
    else:
        from fedgen.pretrain import create_run

        run = create_run(runs_dir, load_config(config), run_id)
    if insecure:
        err_console.print(INSECURE_WARNING)
    if not run.config().privacy.enabled:
        err_console.print("[bold yellow]WARNING: ε = inf — training WITHOUT differential privacy.[/]")
    console.print(f"run folder: {run.root}")
    serve(run, certs=consortium, port=port, host=host, echo=_echo)
    console.print(f"run finished: {run.root}")


@app.command()
def client(
    server_address: Annotated[str, typer.Option("--server", help="The coordinator's SuperLink, HOST:PORT.")],
    data: Annotated[Path, typer.Option(help="This site's folder (images/<class>/*, texts.jsonl, site.toml).")],
    key: Annotated[Path | None, typer.Option(help="This site's node private key (site-K.key from `fedgen certs`).")] = None,
    ca: Annotated[Path | None, typer.Option(help="The consortium CA certificate (ca.crt) that signed the coordinator's.")] = None,
    config: ConfigOption = None,
    runtime_port: Annotated[int | None, typer.Option(help="Local port of the SuperNode's runtime API (default: a free one).")] = None,
    max_wait: Annotated[float | None, typer.Option(help="Give up connecting after this many seconds (default: keep trying).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node authentication: local tests only.")] = False,
) -> None:
    """Site: start a Flower SuperNode serving the fedgen ClientApp for SITE_DIR."""
    from fedgen.clients.deploy import serve_site
    from fedgen.config import load_config
    from fedgen.data.site import check_site

    if not insecure and (key is None or ca is None):
        raise FedgenError("give --key site-K.key and --ca ca.crt (from `fedgen certs`), or --insecure for a local test")
    if insecure and (key is not None or ca is not None):
        raise FedgenError("--insecure runs without TLS and node keys; drop --key and --ca")
    run_config = load_config(config)
    result = check_site(data, run_config.data, channels=run_config.image.channels)
    for problem in result.problems:
        err_console.print(f"problem: {problem}", highlight=False, soft_wrap=True)
    if result.problems:
        raise typer.Exit(EXIT_USER_ERROR)
    if insecure:
        err_console.print(INSECURE_WARNING)
    serve_site(
        data, server=server_address, key=key, ca=ca, runtime_port=runtime_port, max_wait=max_wait,
        echo=_echo,
    )


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="Folder to create (must be absent or empty).")],
    sites: Annotated[int, typer.Option(help="Number of sites: one node key pair each.")] = 3,
    host: Annotated[list[str] | None, typer.Option(help="Name or IP the sites use for the coordinator (repeatable); localhost and 127.0.0.1 are always in.")] = None,
    valid_days: Annotated[int, typer.Option(help="Validity of the CA and server certificates.")] = 365,
) -> None:
    """Make a consortium CA, a server certificate and per-site node keys."""
    from fedgen.certs import make_certs

    if valid_days < 1:
        raise FedgenError(f"--valid-days must be at least 1, got {valid_days}")
    made = make_certs(out, sites=sites, hosts=host or [], valid_days=valid_days)
    console.print(f"wrote the consortium credentials to {made.root}")
    console.print("  coordinator: ca.crt, server.crt, server.key, authorized-keys (move ca.key offline)")
    console.print("  site K:      ca.crt and site-K.key (keep it at the site only)")


EXIT_REFUSED = 3  # `fedgen release` of a run the gate refused (or whose files changed since the audit)
AUDIT_RUN_COMMAND = "run"


class _AuditGroup(_Group):
    """`fedgen audit RUN ...` is short for `fedgen audit run RUN ...`; `fedgen audit phi ...`
    is the standalone scanner. (A run folder named like a subcommand: `fedgen audit run phi`.)"""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [AUDIT_RUN_COMMAND, *args]
        return super().parse_args(ctx, args)


audit_app = typer.Typer(
    cls=_AuditGroup,
    help="Audit a run before release (`fedgen audit RUN`), or scan texts for PHI (`fedgen audit phi`).",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


def _print_decision(gate: dict, json_path: Path, html_path: Path) -> None:
    failed = [check for check in gate["checks"] if not check["passed"]]
    if gate["passed"]:
        console.print(f"[bold green]PASS[/]: every check of the policy ({gate['policy']}) passed; `fedgen release` may copy the data out.")
    else:
        console.print(f"[bold red]REFUSED[/]: {len(failed)} check(s) of the policy ({gate['policy']}) failed:")
    for check in failed:
        console.print(f"  FAIL {check['name']}: {check['detail']}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {html_path}\nfigures: {json_path}", highlight=False, soft_wrap=True)


@audit_app.command(AUDIT_RUN_COMMAND)
def audit_run(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>) with its synthetic data.")],
    policy: Annotated[Path | None, typer.Option(help="Release policy (TOML). Default: the shipped audits/policy.toml.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the gate's decision as one JSON object.")] = False,
    site: Annotated[list[Path] | None, typer.Option(help="A site folder to audit against (repeatable). Default: the run's simulated sites.")] = None,
    deployment: Annotated[bool, typer.Option("--deployment", help="Audit on the real sites: start a SuperLink they connect to with `fedgen client`.")] = False,
    certs_dir: Annotated[Path | None, typer.Option("--certs", help="With --deployment: credentials folder from `fedgen certs`.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="With --deployment: no TLS, no node authentication (local tests only).")] = False,
    port: Annotated[int, typer.Option(help="With --deployment: port of the SuperLink.")] = 9092,
    host: Annotated[str, typer.Option(help="With --deployment: 0.0.0.0 serves the sites; 127.0.0.1 keeps it on this machine.")] = "0.0.0.0",
    inception: Annotated[Path | None, typer.Option(help="A local TorchScript Inception-v3 detector (like inception-2015-12-05.pt) for FID, KID and precision/recall instead of the audit's FeatureNet; every site must hold it at the same path. Never downloaded.")] = None,
) -> None:
    """Run the pre-release audits, apply the release gate, write audit/report.{json,html}.

    Exits 0 whenever the report was written, whatever the decision: `fedgen release` enforces it.
    """
    import json

    from fedgen.audits.gate import load_policy
    from fedgen.audits.report import REPORT_HTML, record_decision, synthetic_manifest, write_report
    from fedgen.artifacts import RunDir
    from fedgen.logs import quiet_libraries

    if not deployment and (certs_dir is not None or insecure):
        raise FedgenError("--certs and --insecure are for --deployment (the real sites)")
    if deployment and site:
        raise FedgenError("--site names simulated sites; with --deployment the sites connect with `fedgen client`")
    run = RunDir.open(run_dir)
    quiet_libraries()
    release_policy = load_policy(policy)  # before the long audit: a bad policy fails at once
    if inception is not None:  # likewise a missing or broken detector
        from fedgen.audits.features import load_inception

        load_inception(inception)
    if deployment:
        from fedgen.server.deploy import check_listen_address, serve_audit

        consortium = _consortium(certs_dir, insecure)
        check_listen_address(host, port)
        if insecure:
            err_console.print(INSECURE_WARNING)
        json_path = serve_audit(run, certs=consortium, policy=policy, inception=inception, port=port, host=host, echo=_echo)
        html_path = json_path.with_name(REPORT_HTML)
        report = json.loads(json_path.read_text(encoding="utf-8"))
    else:
        from fedgen.audits.runner import run_audit

        audited_files = synthetic_manifest(run.synthetic)  # fingerprints of what is audited
        report = record_decision(run_audit(run, sites=site or None, inception=inception), release_policy, audited_files=audited_files)
        json_path, html_path = write_report(run.audit, report)
    if json_output:
        print(json.dumps(report["gate"] | {"report_json": str(json_path), "report_html": str(html_path)}))
    else:
        _print_decision(report["gate"], json_path, html_path)


@audit_app.command("phi")
def audit_phi(
    texts: Annotated[Path, typer.Option(help='A JSONL file of {"text": ...} lines, e.g. synthetic/texts.jsonl.')],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per finding per line.")] = False,
    spacy_model: Annotated[str | None, typer.Option(help="spaCy pipeline (directory or installed package). Default: the offline blank pipeline with name lists.")] = None,
) -> None:
    """Scan texts for PHI offline (Presidio) and list the findings, values redacted."""
    import json

    from rich.table import Table

    from fedgen.audits.phi import build_analyzer, read_texts_jsonl, redact, scan

    lines = read_texts_jsonl(texts)
    analyzer = build_analyzer(spacy_model=spacy_model)
    findings = scan(analyzer, lines)
    if json_output:
        for finding in findings:
            print(json.dumps(finding.to_dict()))
        return
    table = Table("text #", "type", "start", "end", "score", "value (redacted)", title=f"PHI in {texts}")
    for f in findings:
        table.add_row(str(f.index), f.entity_type, str(f.start), str(f.end), f"{f.score:.2f}", redact(lines[f.index][f.start : f.end]))
    console.print(table)
    console.print(f"{len(findings)} finding(s) in {len(lines)} text(s); scanner: {analyzer.engine}", highlight=False, soft_wrap=True)


@app.command()
def release(
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose audit passed the release gate.")],
    to: Annotated[Path | None, typer.Option(help="Folder to create (absent or empty). Default: RUN/release.")] = None,
) -> None:
    """Copy synthetic data, report and a SHA-256 manifest out, only if the gate passed."""
    from fedgen.artifacts import RunDir
    from fedgen.release import MANIFEST_NAME, ReleaseRefused
    from fedgen.release import release as release_run

    try:
        out = release_run(RunDir.open(run_dir), to)
    except ReleaseRefused as refused:
        err_console.print(f"[bold red]{refused}[/]", highlight=False, soft_wrap=True)
        for reason in refused.reasons:
            err_console.print(f"  {reason}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None
    console.print(f"released to {out} (check it with `sha256sum -c {MANIFEST_NAME}` inside it)", highlight=False, soft_wrap=True)
