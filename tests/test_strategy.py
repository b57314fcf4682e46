"""Server-side aggregation: Flower's FedAvg weighted by examples, ε kept as a maximum."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, Error, ConfigRecord, Message, MetricRecord, RecordDict

from fedgen.config import RunConfig
from fedgen.errors import FedgenError
from fedgen.privacy.ledger import PrivacyLedger
from server.strategy import make_strategy


def _reply(node_id, site, weights, n, eps, eps_next=1.0, budget=10.0):
    sent = Message(content=RecordDict(), dst_node_id=node_id, message_type="train")
    metrics = {
        "num-examples": n, "loss": 0.1 * node_id, "epsilon": eps, "epsilon-next": eps_next,
        "budget": budget, "delta": 1e-5, "noise-multiplier": 1.0, "sample-rate": 0.1, "steps": 10,
    }
    content = RecordDict({
        "arrays": ArrayRecord(numpy_ndarrays=[np.asarray(w, dtype=np.float32) for w in weights]),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"name": site}),
    })
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
        ("site-1", 1, 2.0, 100), ("site-2", 1, 3.5, 300)
    ]


def test_a_site_whose_next_round_overspends_is_not_asked_again(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="image")
    w = [np.zeros(2)]
    strategy.aggregate_train(1, [_reply(1, "site-1", w, 10, 9.0, eps_next=10.5), _reply(2, "site-2", w, 10, 2.0)])
    assert strategy.spent_nodes == {1}


def test_a_round_where_every_site_failed_stops_the_run(ledger):
    strategy = make_strategy(RunConfig(), ledger=ledger, modality="image")
    sent = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    failed = Message(Error(code=0, reason="site-1 refuses to train"), reply_to=sent)
    with pytest.raises(FedgenError, match="every site failed round 1: site-1 refuses"):
        strategy.aggregate_train(1, [failed])
