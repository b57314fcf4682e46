"""The coordinator collects the sites' audit answers one by one and says so in a log."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedgen.protocol import SYNTHETIC_IMAGES, SYNTHETIC_TEXTS, pack_reply
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
        message_id, site, *modality = due
        answer = {"site": site, "modality": modality[0] if modality else "image", "synthetic_digest": "sent"}
        return [
            SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=message_id),
                has_error=lambda: site is None,
                content=pack_reply(answer) if site else None,
            )
        ]


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch):
    monkeypatch.setattr(audit_app, "NODE_POLL_SECONDS", 0.0)


def test_each_answer_is_reported_as_it_comes(capsys):
    grid = _Grid([None, ("m1", "site-2"), None, ("m0", "site-1")])
    replies = audit_app._collect_replies(grid, ["q0", "q1"], timeout=60, progress=True)
    assert [r.metadata.reply_to_message_id for r, _ in replies] == ["m1", "m0"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "audit: site-2 answered the image audit (1 of 2, 0:00)",
        "audit: site-1 answered the image audit (2 of 2, 0:00)",
    ]


def test_a_long_wait_says_how_many_sites_are_still_out(monkeypatch, capsys):
    monkeypatch.setattr(audit_app, "WAIT_NOTICE_SECONDS", 0.0)
    grid = _Grid([None, ("m0", None)])
    replies = audit_app._collect_replies(grid, ["q0"], timeout=60, progress=True)
    assert len(replies) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "audit: waiting for 1 of 1 answers (0:00)"
    assert lines[-1] == "audit: a site failed (1 of 1, 0:00)"


def test_the_wait_ends_at_the_timeout_with_the_replies_so_far():
    grid = _Grid([("m0", "site-1")])
    replies = audit_app._collect_replies(grid, ["q0", "q1"], timeout=0.05, progress=False)
    assert len(replies) == 1


def test_every_modality_is_asked_at_once_and_its_answers_come_back_sorted_by_site(monkeypatch):
    """One push for both audits: a site that has answered the image audit starts on the text one
    while the others are still busy."""
    pushed = []

    class Grid(_Grid):
        def get_node_ids(self):
            return [11, 12]

        def push_messages(self, messages):
            pushed.append(list(messages))
            return super().push_messages(messages)

    monkeypatch.setattr(audit_app, "Message", lambda **fields: fields)
    monkeypatch.setattr(
        audit_app, "_query", lambda inputs, name: {"modality": name, SYNTHETIC_IMAGES: None, SYNTHETIC_TEXTS: None}
    )
    monkeypatch.setattr(audit_app, "record_digest", lambda record: "sent")
    # m0, m1: the image audit at nodes 11 and 12; m2, m3: the text audit
    grid = Grid(
        [("m3", "site-b", "text"), ("m0", "site-b", "image"), ("m2", "site-a", "text"), ("m1", "site-a", "image")]
    )
    config = SimpleNamespace(modalities=["image", "text"], federation=SimpleNamespace(round_timeout=60))
    answers = audit_app.audit_sites(grid, SimpleNamespace(config=config), expected_sites=2)
    assert [(m["content"]["modality"], m["dst_node_id"]) for m in pushed[0]] == [
        ("image", 11),
        ("image", 12),
        ("text", 11),
        ("text", 12),
    ]
    assert len(pushed) == 1
    assert {name: [a["site"] for a in site_answers] for name, site_answers in answers.items()} == {
        "image": ["site-a", "site-b"],
        "text": ["site-a", "site-b"],
    }
