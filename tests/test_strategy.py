"""Server-side aggregation: Flower's FedAvg weighted by examples, ε kept as a maximum."""

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedgen.config import RunConfig, load_config
from fedgen.errors import FedgenError
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.server.strategy import make_strategy

RELEASES = itertools.count(1)  # every reply is a new update of its site


def _reply(node_id, site, weights, n, eps, eps_next=1.0, budget=10.0, **extra):
    sent = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = {
        "num-examples": n,
        "loss": 0.1 * node_id,
        "site-epsilon": eps,
        "epsilon": eps,
        "epsilon-next": eps_next,
        "budget": budget,
        "delta": 1e-5,
        "different-people": 0.0,
        "release": next(RELEASES),
        "noise-multiplier": 1.0,
        "sample-rate": 0.1,
        "steps": 10,
        **extra,
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=[np.asarray(w, dtype=np.float32) for w in weights]),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site}),
        }
    )
    return Message(content=content, reply_to=sent)


@pytest.fixture(autouse=True)
def task_identity():
    """Messages need the identity a Flower runtime sets; give them one outside a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


@pytest.fixture
def ledger(tmp_path):
    return PrivacyLedger(tmp_path / "ledger.sqlite")


def test_fedavg_is_the_example_weighted_mean_and_epsilon_the_max(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="image")
    a = [np.array([1.0, 2.0]), np.array([[0.5]])]
    b = [np.array([4.0, -1.0]), np.array([[2.0]])]
    arrays, metrics = strategy.aggregate_train(1, [_reply(1, "site-1", a, 100, 2.0), _reply(2, "site-2", b, 300, 3.5)])
    got = arrays.to_numpy_ndarrays()
    for g, x, y in zip(got, a, b):
        np.testing.assert_allclose(g, (100 * x + 300 * y) / 400, rtol=0, atol=1e-6)
    assert metrics["epsilon-max"] == 3.5
    assert metrics["loss"] == pytest.approx((100 * 0.1 + 300 * 0.2) / 400)
    rows = ledger.entries()
    assert [(r.site, r.round, r.epsilon, r.num_examples) for r in rows] == [
        ("site-1", 1, 2.0, 100),
        ("site-2", 1, 3.5, 300),
    ]


def test_a_site_whose_next_round_overspends_is_not_asked_again(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="image")
    w = [np.zeros(2)]
    strategy.aggregate_train(1, [_reply(1, "site-1", w, 10, 9.0, eps_next=10.5), _reply(2, "site-2", w, 10, 2.0)])
    assert strategy.spent_nodes == {1}


def test_each_text_sites_note_length_is_kept_for_the_round(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="text")
    w = [np.zeros(2)]
    replies = [
        _reply(1, "site-1", w, 10, 1.0, **{"note-tokens": 96}),
        _reply(2, "site-2", w, 10, 1.0, **{"note-tokens": math.nan}),
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.site_note_tokens == {"site-1": 96}  # site-2 has too few notes to say


def test_a_round_where_every_site_failed_stops_the_run(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="image")
    sent = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    failed = Message(Error(code=0, reason="site-1 refuses to train"), reply_to=sent)
    with pytest.raises(FedgenError, match="every site failed round 1: site-1 refuses"):
        strategy.aggregate_train(1, [failed])


def _client_dp(ledger, *, noise, clip, mode="fixed", sites=2, global_arrays=None):
    config = load_config(
        None,
        {
            "federation.sites": sites,
            "federation.client_dp": mode,
            "federation.client_dp_noise_multiplier": noise,
            "federation.client_dp_clipping_norm": clip,
        },
    )
    strategy = make_strategy(config, ledger=ledger, modality="image")
    if global_arrays is not None:  # what configure_train remembers as the round's start
        strategy.current_arrays = ArrayRecord(numpy_ndarrays=[np.asarray(g, dtype=np.float32) for g in global_arrays])
    return strategy


def test_client_dp_without_noise_or_clipping_is_fedavg_and_still_ledgered(ledger, tmp_path):
    g = [np.zeros(2), np.zeros((1, 1))]
    a = [np.array([1.0, 2.0]), np.array([[0.5]])]
    b = [np.array([4.0, -1.0]), np.array([[2.0]])]
    wrapped = _client_dp(ledger, noise=0.0, clip=1e6, global_arrays=g)
    plain = make_strategy(RunConfig(), ledger=PrivacyLedger(tmp_path / "plain.sqlite"), modality="image")
    wrapped.round_offset = 4  # set by run_federation on a resume: must reach the ledger strategy
    got, _ = wrapped.aggregate_train(1, [_reply(1, "site-1", a, 100, 2.0), _reply(2, "site-2", b, 100, 3.0)])
    expected, _ = plain.aggregate_train(1, [_reply(1, "site-1", a, 100, 2.0), _reply(2, "site-2", b, 100, 3.0)])
    for x, y in zip(got.to_numpy_ndarrays(), expected.to_numpy_ndarrays()):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    assert [(r.site, r.round) for r in ledger.entries()] == [("site-1", 5), ("site-2", 5)]
    # Unequal sites are still averaged uniformly: the noise σ·C/n is calibrated for a plain mean.
    got, _ = wrapped.aggregate_train(2, [_reply(1, "site-1", a, 100, 2.0), _reply(2, "site-2", b, 300, 3.0)])
    for x, y, z in zip(got.to_numpy_ndarrays(), a, b):
        np.testing.assert_allclose(x, (y + z) / 2, rtol=0, atol=1e-6)


def test_client_dp_clips_each_update_to_the_clipping_norm(ledger):
    g = [np.array([1.0, 1.0]), np.array([[1.0]])]
    far = [np.array([4.0, 5.0]), np.array([[1.0]])]  # update (3, 4, 0): norm 5, clipped to 1
    near = [np.array([1.0, 1.5]), np.array([[1.0]])]  # update (0, 0.5, 0): inside the norm
    strategy = _client_dp(ledger, noise=0.0, clip=1.0, global_arrays=g)
    got, _ = strategy.aggregate_train(1, [_reply(1, "site-1", far, 10, 1.0), _reply(2, "site-2", near, 10, 1.0)])
    got = got.to_numpy_ndarrays()
    np.testing.assert_allclose(got[0], [1.0 + 0.6 / 2, 1.0 + (0.8 + 0.5) / 2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[1], [[1.0]], rtol=0, atol=1e-6)
    alone, _ = strategy.aggregate_train(2, [_reply(1, "site-1", far, 10, 1.0)])
    delta = np.concatenate([(x - y).ravel() for x, y in zip(alone.to_numpy_ndarrays(), g)])
    assert np.linalg.norm(delta) == pytest.approx(1.0, abs=1e-6)


def test_client_dp_noise_is_scaled_to_the_sites_that_replied_and_failures_are_kept(ledger):
    np.random.seed(0)  # Flower's wrapper draws from numpy's global generator
    g = [np.zeros(20_000)]
    strategy = _client_dp(ledger, noise=1.0, clip=0.5, sites=3, global_arrays=g)
    sent = Message(content=RecordDict(), dst_node_id=3, message_type="train")
    failed = Message(Error(code=0, reason="site-3 lost power"), reply_to=sent)
    tiny = [np.full(20_000, 1e-4)]
    got, _ = strategy.aggregate_train(
        1, [_reply(1, "site-1", tiny, 10, 1.0), _reply(2, "site-2", tiny, 10, 1.0), failed]
    )
    noise = got.to_numpy_ndarrays()[0] - 1e-4
    assert np.std(noise) == pytest.approx(1.0 * 0.5 / 2, rel=0.03)  # σ·C/n with n = 2 replies, not 3
    assert [r.site for r in ledger.entries()] == ["site-1", "site-2"]
    assert strategy.failures == ["site-3 lost power"]


def test_client_dp_settings_flower_refuses_are_one_line(ledger):
    with pytest.raises(FedgenError, match=r"federation.client_dp = 'adaptive': .*too low"):
        _client_dp(ledger, noise=1.0, clip=1.0, mode="adaptive", sites=3)
    with pytest.raises(FedgenError, match="client_dp needs strategy 'fedavg' or 'fedprox'"):
        load_config(None, {"federation.strategy": "fedadam", "federation.client_dp": "fixed"})


def _site_reply(node_id, site, release_history, account, *, modality="image"):
    """A site's reply as fedgen.clients sends it: its ε over everything it released, and the list."""
    histories = {modality: release_history}
    metrics = {
        "num-examples": 100,
        "loss": float("nan"),
        "site-epsilon": account.epsilon(histories),
        "epsilon": account.epsilon(histories),
        "epsilon-next": 1.0,
        "budget": account.budget,
        "delta": account.delta,
        "different-people": 0.0,
        "release": len(release_history),
        "noise-multiplier": release_history[-1][0],
        "sample-rate": release_history[-1][1],
        "steps": release_history[-1][2],
    }
    sent = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    content = RecordDict(
        {
            "arrays": ArrayRecord(numpy_ndarrays=[np.zeros(2, dtype=np.float32)]),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"name": site, "released": json.dumps(histories)}),
        }
    )
    return Message(content=content, reply_to=sent)


@pytest.mark.parametrize("accountant", ["rdp", pytest.param("prv", marks=pytest.mark.slow)])
def test_an_update_lost_in_a_coordinator_crash_is_ledgered_and_epsilon_recomputes(ledger, tmp_path, accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant
    from typer.testing import CliRunner

    from fedgen.artifacts import RunDir
    from fedgen.cli import app
    from fedgen.privacy.plan import SiteAccount

    account = SiteAccount("site-1", 10.0, 1e-4, "same people", accountant)
    entry = (1.1, 0.05, 40)
    config = RunConfig.model_validate({"federation": {"sites": 1}, "privacy": {"accountant": accountant}})
    make_strategy(config, ledger=ledger, modality="image").aggregate_train(
        1, [_site_reply(1, "site-1", [entry], account)]
    )
    # Round 2: the site released its second update, then the coordinator died before recording it.
    resumed = make_strategy(config, ledger=ledger, modality="image")
    resumed.round_offset = 1  # round 2 again, after the resume
    resumed.aggregate_train(1, [_site_reply(1, "site-1", [entry] * 3, account)])

    rows = ledger.entries(site="site-1")
    assert [(r.round, r.release, r.lost) for r in rows] == [(1, 1, False), (2, 2, True), (2, 3, False)]
    assert {r.accountant for r in rows} == {accountant}
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    independent.history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in rows]
    assert rows[-1].site_epsilon == pytest.approx(independent.get_epsilon(delta=1e-4), rel=0.01)

    run = RunDir.create(tmp_path / "runs", config, "r1")
    run.ledger_path.write_bytes(ledger.path.read_bytes())
    result = CliRunner().invoke(app, ["ledger", str(run.root)])
    assert result.exit_code == 0, result.output
    (line,) = [row for row in result.output.splitlines() if row.startswith("site-1")]
    recorded, recomputed = line.split()[-2:]
    assert recorded == recomputed == f"{rows[-1].site_epsilon:.4f}"
    assert line.split()[1:3] == ["3", "1"]  # three updates, one of them lost
    snippet = result.output[result.output.index("import sqlite3") :]
    printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True).stdout
    assert float(printed) == pytest.approx(rows[-1].site_epsilon, rel=0.01)
    site_side = CliRunner().invoke(app, ["ledger", str(ledger.path)])  # a ledger file, e.g. a site's own
    assert site_side.exit_code == 0 and line in site_side.output
    empty = CliRunner().invoke(app, ["ledger", str(RunDir.create(tmp_path / "runs", config, "r2").root)])
    assert empty.exit_code == 1 and "holds no update yet" in empty.output
