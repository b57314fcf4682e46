"""`fedgen audit RUN`, `fedgen audit phi` and `fedgen release`: the pre-release audit and its gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fedgen.cli.common import (
    EXIT_REFUSED,
    INSECURE_WARNING,
    Group,
    console,
    coordinator_certs,
    echo_line,
    err_console,
)
from fedgen.errors import FedgenError

__all__ = ["AUDIT_RUN_COMMAND", "AuditGroup", "audit_run", "audit_phi", "release"]

AUDIT_RUN_COMMAND = "run"


class AuditGroup(Group):
    """`fedgen audit RUN ...` is short for `fedgen audit run RUN ...`; `fedgen audit phi ...`
    is the standalone scanner. (A run folder named like a subcommand: `fedgen audit run phi`.)"""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [AUDIT_RUN_COMMAND, *args]
        return super().parse_args(ctx, args)


def _print_decision(gate: dict, json_path: Path, html_path: Path) -> None:
    failed = [check for check in gate["checks"] if not check["passed"]]
    if gate["passed"]:
        console.print(
            f"[bold green]PASS[/]: every check of the policy ({gate['policy']}) passed; `fedgen release` may copy the data out."
        )
    else:
        console.print(f"[bold red]REFUSED[/]: {len(failed)} check(s) of the policy ({gate['policy']}) failed:")
    for check in failed:
        console.print(f"  FAIL {check['name']}: {check['detail']}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {html_path}\nfigures: {json_path}", highlight=False, soft_wrap=True)


def audit_run(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (runs/<run-id>) with its synthetic data.")],
    policy: Annotated[
        Path | None, typer.Option(help="Release policy (TOML). Default: the shipped audits/policy.toml.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the gate's decision as one JSON object.")] = False,
    site: Annotated[
        list[Path] | None,
        typer.Option(help="A site folder to audit against (repeatable). Default: the run's simulated sites."),
    ] = None,
    deployment: Annotated[
        bool,
        typer.Option(
            "--deployment", help="Audit on the real sites: start a SuperLink they connect to with `fedgen client`."
        ),
    ] = False,
    certs_dir: Annotated[
        Path | None,
        typer.Option(
            "--certs",
            help="Credentials folder from `fedgen certs`: the coordinator's key signs the decision (and, with --deployment, serves the sites).",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="With --deployment: no TLS, no node authentication (local tests only).")
    ] = False,
    port: Annotated[int, typer.Option(help="With --deployment: port of the SuperLink.")] = 9092,
    host: Annotated[
        str, typer.Option(help="With --deployment: 0.0.0.0 serves the sites; 127.0.0.1 keeps it on this machine.")
    ] = "0.0.0.0",
    inception: Annotated[
        Path | None,
        typer.Option(
            help="A local TorchScript Inception-v3 detector (like inception-2015-12-05.pt) for FID, KID and precision/recall instead of the audit's FeatureNet; every site must hold it at the same path. Never downloaded."
        ),
    ] = None,
    review: Annotated[
        list[Path] | None,
        typer.Option(
            help="A site's SCORES.json from `fedgen review score` (repeatable): the sites' blinded clinical review, pooled into the report."
        ),
    ] = None,
) -> None:
    """Run the pre-release audits, apply the release gate, write audit/report.{json,html}.

    Exits 0 whenever the report was written, whatever the decision: `fedgen release` enforces it.
    """
    import json

    from fedgen.artifacts import RunDir
    from fedgen.audits.gate import load_policy, record_decision
    from fedgen.audits.inputs import check_inputs
    from fedgen.audits.release import seal
    from fedgen.audits.report import REPORT_HTML, write_report
    from fedgen.certs import load_certs
    from fedgen.logs import quiet_libraries
    from fedgen.manifest import synthetic_manifest

    if not deployment and insecure:
        raise FedgenError("--insecure is for --deployment (the real sites)")
    if deployment and site:
        raise FedgenError("--site names simulated sites; with --deployment the sites connect with `fedgen client`")
    run = RunDir.open(run_dir)
    quiet_libraries()
    release_policy = load_policy(policy)  # before the long audit: a bad policy fails at once
    signer = load_certs(certs_dir) if certs_dir is not None else None  # likewise missing credentials
    if inception is not None:  # likewise a missing or broken detector
        from fedgen.audits.features import load_inception

        load_inception(inception)
    clinical_review = _pooled_review(review, run.root.name) if review else None  # and a bad scores file
    if deployment:  # the options first, then the run's inputs
        from fedgen.server.deploy import serve_audit
        from fedgen.server.superlink import check_listen_address

        consortium = coordinator_certs(certs_dir, insecure)
        check_listen_address(host, port)
    check_inputs(run)  # ledger, checkpoints, synthetic data: before any site is asked or anything written
    if deployment:
        if insecure:
            err_console.print(INSECURE_WARNING)
        json_path = serve_audit(
            run, certs=consortium, policy=policy, inception=inception, port=port, host=host, echo=echo_line
        )
        html_path = json_path.with_name(REPORT_HTML)
        report = json.loads(json_path.read_text(encoding="utf-8"))
        if clinical_review is not None:  # not part of the gate: added beside its decision
            report["review"] = clinical_review
            json_path, html_path = write_report(run.audit, report)
    else:
        from fedgen.simulations.engine import run_audit

        audited_files = synthetic_manifest(run.synthetic)  # fingerprints of what is audited
        report = run_audit(run, sites=site or None, inception=inception)
        if clinical_review is not None:
            report["review"] = clinical_review
        report = record_decision(report, release_policy, audited_files=audited_files)
        json_path, html_path = write_report(run.audit, report)
    seal(run, release_policy, signer)
    if json_output:
        print(json.dumps(report["gate"] | {"report_json": str(json_path), "report_html": str(html_path)}))
    else:
        _print_decision(report["gate"], json_path, html_path)


def _pooled_review(paths: list[Path], run_id: str) -> dict:
    """The sites' review scores pooled for the report (each file must score a kit of this run)."""
    from fedgen.audits.review import pool_scores, read_scores

    return pool_scores([read_scores(path) for path in paths], run_id=run_id, sources=[str(path) for path in paths])


def audit_phi(
    texts: Annotated[Path, typer.Option(help='A JSONL file of {"text": ...} lines, e.g. synthetic/texts.jsonl.')],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per finding per line.")] = False,
    spacy_model: Annotated[
        str | None,
        typer.Option(
            help="spaCy pipeline whose NER the scan uses (directory or installed package). Default: spaCy's en_core_web_sm, installed with fedgen."
        ),
    ] = None,
    processes: Annotated[
        int, typer.Option(min=1, help="Processes that scan (forked after the detector is built; same findings).")
    ] = 1,
) -> None:
    """Scan texts for PHI offline (NER, Presidio and fedgen's rules) and list the findings, values redacted."""
    import json

    from rich.table import Table

    from fedgen.audits.phi import build_analyzer, read_texts_jsonl, redact, scan

    lines = read_texts_jsonl(texts)
    analyzer = build_analyzer(spacy_model=spacy_model)
    findings = scan(analyzer, lines, processes=processes)
    if json_output:
        for finding in findings:
            print(json.dumps(finding.to_dict()))
        return
    table = Table("text #", "type", "start", "end", "score", "value (redacted)", title=f"PHI in {texts}")
    for f in findings:
        table.add_row(
            str(f.index),
            f.entity_type,
            str(f.start),
            str(f.end),
            f"{f.score:.2f}",
            redact(lines[f.index][f.start : f.end]),
        )
    console.print(table)
    console.print(
        f"{len(findings)} finding(s) in {len(lines)} text(s); scanner: {analyzer.engine}",
        highlight=False,
        soft_wrap=True,
    )


def release(
    run_dir: Annotated[Path, typer.Argument(help="A run folder whose audit passed the release gate.")],
    to: Annotated[Path | None, typer.Option(help="Folder to create (absent or empty). Default: RUN/release.")] = None,
    certs_dir: Annotated[
        Path | None,
        typer.Option(
            "--certs",
            help="A folder holding the coordinator's server.crt (from `fedgen certs`): release only a decision it signed.",
        ),
    ] = None,
) -> None:
    """Copy synthetic data, report and a SHA-256 manifest out, only if the gate passed.

    The recorded policy is applied again to the recorded figures; with --certs the decision
    must carry the coordinator's signature over the report, the policy and the synthetic files.
    """
    from fedgen.artifacts import RunDir
    from fedgen.audits.release import ReleaseRefused
    from fedgen.audits.release import release as release_run
    from fedgen.certs import ConsortiumCerts
    from fedgen.manifest import MANIFEST_NAME

    certs = None
    if certs_dir is not None:
        certs = ConsortiumCerts(certs_dir)
        if not certs.server_cert.is_file():
            raise FedgenError(f"{certs_dir} has no server.crt (the coordinator's certificate from `fedgen certs`)")
    try:
        out = release_run(RunDir.open(run_dir), to, certs=certs)
    except ReleaseRefused as refused:
        err_console.print(f"[bold red]{escape(str(refused))}[/]", highlight=False, soft_wrap=True)
        for reason in refused.reasons:
            err_console.print(f"  {reason}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED) from None
    console.print(
        f"released to {out} (check it with `sha256sum -c {MANIFEST_NAME}` inside it)", highlight=False, soft_wrap=True
    )
