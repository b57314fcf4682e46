"""SecAgg+ on Flower's simulation engine: the secure aggregate is plain FedAvg of the same updates."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedgen.clients.secagg import secagg_mod, train_inputs, train_reply
from fedgen.config import load_config
from fedgen.privacy.ledger import PrivacyLedger
from fedgen.server.secagg import CLIPPING_RANGE, start_secagg
from fedgen.server.strategy import make_strategy
from fedgen.simulations.engine import CPUS_PER_SITE
from tests.replies import training_metrics

SITES = 3
MAX_WEIGHT = 30  # the largest site's examples: the finest weights SecAgg+ can quantise
GLOBAL = {"w": torch.zeros(3, 4), "b": torch.linspace(-1.0, 1.0, 5)}


def site_update(pid: int) -> tuple[dict[str, torch.Tensor], int]:
    """A deterministic 'trained' state and example count per simulated site."""
    g = torch.Generator().manual_seed(pid)
    state = {k: v + torch.rand(v.shape, generator=g) * 4 - 2 for k, v in GLOBAL.items()}
    return state, 10 * (pid + 1)


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        state, settings = train_inputs(msg.content)
        assert int(settings["server-round"]) == 1 and set(state) == set(GLOBAL)
        pid = int(context.node_config["partition-id"])
        update, n = site_update(pid)
        metrics = training_metrics(num_examples=n, site_epsilon=1.0 + pid, epsilon=1.0 + pid, steps=3)
        released = json.dumps({"image": [[1.0, 0.1, 3]]})
        return Message(
            content=train_reply(msg.content, update, metrics, f"site-{pid + 1}", released=released), reply_to=msg
        )

    return app


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    from flwr.simulation import run_simulation

    ledger = PrivacyLedger(tmp_path_factory.mktemp("secagg") / "ledger.sqlite")
    config = load_config(
        None,
        {
            "federation.sites": SITES,
            "federation.secagg": True,
            "federation.rounds": 1,
            "federation.secagg_max_weight": MAX_WEIGHT,
        },
    )
    checkpoints: dict[int, dict[str, np.ndarray]] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def keep(server_round: int, arrays: ArrayRecord) -> None:
            checkpoints[server_round] = {k: a.numpy() for k, a in arrays.items()}

        start_secagg(
            make_strategy(config, ledger=ledger, modality="image"),
            grid=grid,
            initial_arrays=ArrayRecord(torch_state_dict=GLOBAL),
            num_rounds=1,
            timeout=180.0,  # per SecAgg+ stage: three Ray workers start on two busy cores
            train_config=ConfigRecord({"modality": "image"}),
            evaluate_fn=keep,
            max_weight=config.federation.secagg_max_weight,
        )

    run_simulation(
        server_app=server,
        client_app=make_client_app(),
        num_supernodes=SITES,
        backend_config={
            "client_resources": {"num_cpus": CPUS_PER_SITE, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": False},
        },
    )
    return checkpoints, ledger


@pytest.mark.e2e
def test_the_secure_aggregate_is_fedavg_of_the_site_updates(secure_run):
    checkpoints, _ = secure_run
    updates = [site_update(pid) for pid in range(SITES)]
    total = sum(n for _, n in updates)
    # Each site's weighted update is stochastically rounded to one of 2^22 levels over
    # [-8, 8]: at most one level off per site, then divided by the summed weights.
    tolerance = SITES * (2 * CLIPPING_RANGE / 2**22) / (total / MAX_WEIGHT)
    assert sorted(checkpoints) == [0, 1]
    for key in GLOBAL:
        expected = sum(n * state[key].numpy() for state, n in updates) / total
        got = checkpoints[1][key]
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
        assert not np.allclose(got, updates[0][0][key].numpy(), atol=1e-2)  # not one site's update


@pytest.mark.e2e
def test_every_site_is_ledgered_under_secagg(secure_run):
    _, ledger = secure_run
    rows = sorted((r.site, r.round, r.epsilon, r.num_examples) for r in ledger.entries())
    assert rows == [("site-1", 1, 1.0, 10), ("site-2", 1, 2.0, 20), ("site-3", 1, 3.0, 30)]


@pytest.mark.e2e
def test_a_fedgen_image_federation_runs_under_secagg(tmp_path):
    """The real ClientApp and ServerApp: every round checkpointed and ledgered per site."""
    from safetensors.torch import load_file

    from fedgen.artifacts import RunDir
    from fedgen.data.demo import make_demo_consortium
    from fedgen.simulations.engine import check_sites, simulate

    sites = make_demo_consortium(
        tmp_path / "sites", sites=2, seed=1, images_per_site=24, texts_per_site=10, resolution=16
    )
    config = load_config(
        None,
        {
            "modality": "image",
            "federation.rounds": 2,
            "federation.sites": 2,
            "federation.secagg": True,
            "privacy.epsilon": 8.0,
            "image.resolution": 16,
            "image.block_out_channels": [16, 32],
            "image.norm_num_groups": 4,
            "image.batch_size": 8,
            "image.local_epochs": 1,
        },
    )
    check_sites(config, sites)
    run = RunDir.create(tmp_path / "runs", config, "secagg")
    simulate(run, sites)
    assert run.completed_rounds("image") == [1, 2]
    rows = PrivacyLedger(run.ledger_path).entries(modality="image")
    assert sorted((r.site, r.round) for r in rows) == [("site-1", 1), ("site-1", 2), ("site-2", 1), ("site-2", 2)]
    weights = [load_file(str(run.round_dir(r) / "image" / "diffusion_pytorch_model.safetensors")) for r in (1, 2)]
    assert weights[0]["conv_in.weight"].dtype == torch.float32
    assert not torch.allclose(weights[0]["conv_in.weight"], weights[1]["conv_in.weight"])


def test_plain_rounds_pass_the_secagg_mod_untouched():
    from flwr.app import MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgen.errors import FedgenError

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        content = RecordDict(
            {"arrays": ArrayRecord(torch_state_dict=GLOBAL), "config": ConfigRecord({"server-round": 4})}
        )
        msg = Message(content=content, dst_node_id=1, message_type="train")
        reply = secagg_mod(
            msg, None, lambda m, _: Message(content=RecordDict({"seen": m.content["config"]}), reply_to=m)
        )
        assert reply.content["seen"]["server-round"] == 4
    finally:
        TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
    state, settings = train_inputs(content)
    assert settings["server-round"] == 4 and torch.equal(state["b"], GLOBAL["b"])
    out = train_reply(
        content, {"w": GLOBAL["w"] + 1}, {"num-examples": 7}, "site-9", released='{"text": [[1.0, 0.1, 3]]}'
    )
    assert sorted(out) == ["arrays", "metrics", "site"] and out["site"]["name"] == "site-9"
    assert out["site"]["released"] == '{"text": [[1.0, 0.1, 3]]}'
    assert out["metrics"] == MetricRecord({"num-examples": 7})
    assert torch.equal(out["arrays"].to_torch_state_dict()["w"], GLOBAL["w"] + 1)
    with pytest.raises(FedgenError, match="client_dp clips each site's update, which secagg hides"):
        load_config(None, {"federation.secagg": True, "federation.client_dp": "fixed"})


def test_a_round_secagg_halted_is_an_error_not_a_checkpoint():
    from flwr.common import ndarrays_to_parameters

    from fedgen.errors import FedgenError
    from fedgen.server.secagg import _LedgerStrategyAdapter

    saved = []
    initial = ArrayRecord(torch_state_dict=GLOBAL)
    adapter = _LedgerStrategyAdapter(None, None, initial, ConfigRecord(), lambda r, a: saved.append(r))
    parameters = ndarrays_to_parameters(initial.to_numpy_ndarrays())
    adapter.evaluate(0, parameters)
    with pytest.raises(FedgenError, match="round 1: secure aggregation halted"):
        adapter.evaluate(1, parameters)  # aggregate_fit never ran for round 1
    assert saved == [0]
