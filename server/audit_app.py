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
    grid: Grid, messages: list[Message], *, timeout: float, progress: bool
) -> list[tuple[Message, dict | None]]:
    """The replies that came within ``timeout``, each with its unpacked answer (None for an
    error), saying (when ``progress``) each site's answer as it comes and, in a long wait, every
    ``WAIT_NOTICE_SECONDS`` how many are still out: a site audit takes minutes and a log would
    otherwise show nothing between question and result."""
    waiting = set(grid.push_messages(messages))
    start = time.monotonic()
    next_notice = start + WAIT_NOTICE_SECONDS
    replies: list[tuple[Message, dict | None]] = []
    while waiting and time.monotonic() - start < timeout:
        for reply in grid.pull_messages(waiting):
            waiting.discard(reply.metadata.reply_to_message_id)
            answer = None if reply.has_error() else unpack_reply(reply.content)
            replies.append((reply, answer))
            who = "a site failed" if answer is None else f"{answer['site']} answered the {answer['modality']} audit"
            say(progress, f"{who} ({len(replies)} of {len(messages)}, {clock(time.monotonic() - start)})")
        if not waiting:
            break
        if time.monotonic() >= next_notice:
            elapsed = clock(time.monotonic() - start)
            say(progress, f"waiting for {len(waiting)} of {len(messages)} answers ({elapsed})")
            next_notice += WAIT_NOTICE_SECONDS
        time.sleep(NODE_POLL_SECONDS)
    return replies


def _query(inputs: AuditInputs, name: str) -> RecordDict:
    config = inputs.config
    return make_query(
        config,
        name,
        QUERY_AUDIT,
        model_state=inputs.model_states[name],
        synthetic_images=inputs.synthetic_images if name == "image" else None,
        synthetic_texts=inputs.synthetic_texts if name == "text" else None,
        inception=inputs.inception.path if name == "image" and inputs.inception is not None else None,
    )


def _modality_answers(answers: list[dict], name: str, query: RecordDict, *, sites: int) -> list[dict]:
    """The ``name`` audit's answers, one per site, sorted by site name, on the synthetic data sent."""
    mine = sorted((a for a in answers if a["modality"] == name), key=lambda a: a["site"])
    names = [answer["site"] for answer in mine]
    if len(set(names)) < len(names):
        raise FedgenError(
            f"two sites answered the {name} audit under one name: {names} (is a site folder served twice?)"
        )
    if len(mine) != sites:
        raise FedgenError(f"{len(mine)} of {sites} sites answered the {name} audit")
    sent = record_digest(query[SYNTHETIC_IMAGES if name == "image" else SYNTHETIC_TEXTS])
    other = [a["site"] for a in mine if a["synthetic_digest"] != sent]
    if other:
        raise FedgenError(f"{', '.join(other)} answered the {name} audit on other synthetic data than was sent")
    return mine


def audit_sites(
    grid: Grid, inputs: AuditInputs, *, expected_sites: int, progress: bool = False
) -> dict[str, list[dict]]:
    """Per modality, every site's answers (sorted by site name).

    Every modality's query goes out at once: a site that has answered one starts on the next
    while slower sites are still busy, where asking one modality after the other would leave
    it idle until the slowest site had answered."""
    config = inputs.config
    nodes = _wait_for_nodes(grid, expected_sites)
    timeout = config.federation.round_timeout
    queries = {name: _query(inputs, name) for name in config.modalities}
    say(progress, f"{' and '.join(queries)}: asking {len(nodes)} sites")
    messages = [
        Message(content=query, dst_node_id=node, message_type=MessageType.QUERY)
        for query in queries.values()
        for node in nodes
    ]
    replies = _collect_replies(grid, messages, timeout=timeout, progress=progress)
    failed = [reply for reply, answer in replies if answer is None]
    if failed:
        raise FedgenError(f"a site could not answer the audit: {error_line(failed[0].error.reason)}")
    if len(replies) < len(messages):
        raise FedgenError(
            f"{len(messages) - len(replies)} of {len(messages)} audit answers did not come within {timeout:.0f} s"
        )
    answers = [answer for _, answer in replies]
    return {name: _modality_answers(answers, name, query, sites=len(nodes)) for name, query in queries.items()}


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
