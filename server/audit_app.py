"""The audit ServerApp: ask every site that trained, pool the answers, apply the gate, write the report.

The coordinator holds the final model, the synthetic data and the privacy ledger, never a real
record (fedgen.audits.inputs). It sends each site a Flower query (fedgen.clients.site_audit
answers it where the data lives; layout in fedgen.protocol) and pools the aggregates that come
back (fedgen.audits.pooling). Everything comes from the run folder, so the same functions serve
the simulation engine (``make_audit_app``, fedgen.simulations.engine) and the deployment
engine, where a SuperLink starts ``app`` with the run config keys of ``AUDIT_RUN_CONFIG`` (the
coordinator submits it with ``fedgen audit RUN --deployment``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedgen.artifacts import RunDir
from fedgen.audits.gate import Policy, load_policy, record_decision
from fedgen.audits.inputs import AuditInputs, prepare_inputs, say
from fedgen.audits.pooling import assemble_report, trained_sites
from fedgen.audits.report import write_report
from fedgen.errors import FedgenError
from fedgen.logs import clock
from fedgen.manifest import synthetic_manifest
from fedgen.protocol import (
    INCEPTION_KEY,
    POLICY_KEY,
    QUERY_AUDIT,
    RUN_DIR_KEY,
    SYNTHETIC_IMAGES,
    SYNTHETIC_TEXTS,
    error_line,
    make_query,
    record_digest,
    unpack_reply,
)

__all__ = ["audit_sites", "audit_report", "audit_and_write", "make_audit_app", "app"]

NODE_WAIT_SECONDS = 120.0
NODE_POLL_SECONDS = 0.5
WAIT_NOTICE_SECONDS = 60.0


def _wait_for_nodes(grid: Grid, expected: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FedgenError(
                f"only {len(nodes)} of {expected} sites connected for the audit within {NODE_WAIT_SECONDS:.0f} s"
            )
        time.sleep(NODE_POLL_SECONDS)
    return nodes


def _collect_replies(
    grid: Grid, messages: list[Message], *, timeout: float, what: str, progress: bool
) -> list[Message]:
    """The replies that came within ``timeout``, saying (when ``progress``) each site's answer
    as it comes and, in a long wait, every ``WAIT_NOTICE_SECONDS`` how many are still out: a
    site audit takes minutes and a log would otherwise show nothing between question and result."""
    waiting = set(grid.push_messages(messages))
    start = time.monotonic()
    next_notice = start + WAIT_NOTICE_SECONDS
    replies: list[Message] = []
    while waiting and time.monotonic() - start < timeout:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            who = "a site failed" if reply.has_error() else f"{unpack_reply(reply.content)['site']} answered"
            say(progress, f"{what}: {who} ({len(replies)} of {len(messages)}, {clock(time.monotonic() - start)})")
        if not waiting:
            break
        if time.monotonic() >= next_notice:
            elapsed = clock(time.monotonic() - start)
            say(progress, f"{what}: waiting for {len(waiting)} of {len(messages)} sites ({elapsed})")
            next_notice += WAIT_NOTICE_SECONDS
        time.sleep(NODE_POLL_SECONDS)
    return replies


def _ask(
    grid: Grid, nodes: Sequence[int], content: RecordDict, *, timeout: float, what: str, progress: bool = False
) -> list[dict]:
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    replies = _collect_replies(grid, messages, timeout=timeout, what=what, progress=progress)
    failed = [r for r in replies if r.has_error()]
    if failed:
        raise FedgenError(f"a site could not answer the {what}: {error_line(failed[0].error.reason)}")
    if len(replies) < len(nodes):
        raise FedgenError(
            f"{len(nodes) - len(replies)} of {len(nodes)} sites did not answer the {what} within {timeout:.0f} s"
        )
    answers = sorted((unpack_reply(r.content) for r in replies), key=lambda r: r["site"])
    names = [answer["site"] for answer in answers]
    if len(set(names)) < len(names):
        raise FedgenError(f"two sites answered the {what} under one name: {names} (is a site folder served twice?)")
    return answers


def audit_sites(
    grid: Grid, inputs: AuditInputs, *, expected_sites: int, progress: bool = False
) -> dict[str, list[dict]]:
    """Per modality, every site's answers (sorted by site name)."""
    config = inputs.config
    nodes = _wait_for_nodes(grid, expected_sites)
    timeout = config.federation.round_timeout
    answers = {}
    for name in config.modalities:
        state = inputs.model_states[name]
        say(progress, f"{name}: asking {len(nodes)} sites")
        audit = make_query(
            config,
            name,
            QUERY_AUDIT,
            model_state=state,
            synthetic_images=inputs.synthetic_images if name == "image" else None,
            synthetic_texts=inputs.synthetic_texts if name == "text" else None,
            inception=inputs.inception.path if name == "image" and inputs.inception is not None else None,
        )
        sent = record_digest(audit[SYNTHETIC_IMAGES if name == "image" else SYNTHETIC_TEXTS])
        answers[name] = _ask(grid, nodes, audit, timeout=timeout, what=f"{name} audit", progress=progress)
        other = [a["site"] for a in answers[name] if a["synthetic_digest"] != sent]
        if other:
            raise FedgenError(f"{', '.join(other)} answered the {name} audit on other synthetic data than was sent")
    return answers


def audit_report(
    grid: Grid, run: RunDir, *, expected_sites: int, inception: str | Path | None = None, progress: bool = False
) -> dict:
    """report.json (without "gate") from the sites reachable through ``grid``.

    Everything comes from the run folder (and the Inception path, if any), so the same function
    serves a ServerApp started by the simulation and one started by a SuperLink from its run config.
    """
    inputs = prepare_inputs(run, inception=inception, progress=progress)
    answers = audit_sites(grid, inputs, expected_sites=expected_sites, progress=progress)
    return assemble_report(inputs, answers, progress=progress)


def audit_and_write(
    grid: Grid, run: RunDir, *, policy: Policy, inception: str | Path | None = None, progress: bool = True
) -> tuple[Path, Path]:
    """The whole audit of a run whose sites connect through ``grid`` (deployment): ask every
    site that trained, apply the gate, write audit/report.json and report.html (each atomically)."""
    audited_files = synthetic_manifest(run.synthetic)  # fingerprints of what is audited
    report = audit_report(grid, run, expected_sites=len(trained_sites(run)), inception=inception, progress=progress)
    json_path, html_path = write_report(run.audit, record_decision(report, policy, audited_files=audited_files))
    say(progress, f"report written: {html_path}")
    return json_path, html_path


def make_audit_app(
    run: RunDir, *, expected_sites: int, sink: dict, inception: str | Path | None = None, progress: bool = False
) -> ServerApp:
    """A ServerApp that audits the run on every site and leaves the report in ``sink["report"]``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        sink["report"] = audit_report(grid, run, expected_sites=expected_sites, inception=inception, progress=progress)

    return app


def _deployed_main(grid: Grid, context: Context) -> None:
    """The deployment engine's audit: everything from the run config (paths, absolute)."""
    root = context.run_config.get(RUN_DIR_KEY)
    if not root:
        raise FedgenError(f"no run folder: pass {RUN_DIR_KEY} in the run config")
    policy = str(context.run_config.get(POLICY_KEY, "")) or None
    inception = str(context.run_config.get(INCEPTION_KEY, "")) or None
    audit_and_write(grid, RunDir.open(root), policy=load_policy(policy), inception=inception)


app = ServerApp()
app.main()(_deployed_main)
