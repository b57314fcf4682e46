"""The coordinator collects the sites' audit answers one by one and says so in a log."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedgen.protocol import pack_reply
from fedgen.server import audit_app


class _Grid:
    """Replies become available one pull at a time, in the order given; None is an empty pull."""

    def __init__(self, schedule):
        self.schedule = list(schedule)

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, waiting):
        due = self.schedule.pop(0) if self.schedule else None
        if due is None or due[0] not in waiting:
            return []
        message_id, site = due
        return [
            SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=message_id),
                has_error=lambda: site is None,
                content=pack_reply({"site": site}) if site else None,
            )
        ]


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(audit_app, "NODE_POLL_SECONDS", 0.0)


def test_each_answer_is_reported_as_it_comes(capsys):
    grid = _Grid([None, ("m1", "site-2"), None, ("m0", "site-1")])
    replies = audit_app._collect_replies(grid, ["q0", "q1"], timeout=60, what="image audit", progress=True)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m0"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "audit: image audit: site-2 answered (1 of 2, 0:00)",
        "audit: image audit: site-1 answered (2 of 2, 0:00)",
    ]


def test_a_long_wait_says_how_many_sites_are_still_out(monkeypatch, capsys):
    monkeypatch.setattr(audit_app, "WAIT_NOTICE_SECONDS", 0.0)
    grid = _Grid([None, ("m0", None)])
    replies = audit_app._collect_replies(grid, ["q0"], timeout=60, what="text audit", progress=True)
    assert len(replies) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "audit: text audit: waiting for 1 of 1 sites (0:00)"
    assert lines[-1] == "audit: text audit: a site failed (1 of 1, 0:00)"


def test_the_wait_ends_at_the_timeout_with_the_replies_so_far():
    grid = _Grid([("m0", "site-1")])
    replies = audit_app._collect_replies(grid, ["q0", "q1"], timeout=0.05, what="image audit", progress=False)
    assert len(replies) == 1
