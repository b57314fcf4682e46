"""A site's own policy: what it trains with and which audit answers it gives, whatever the run asks."""

from __future__ import annotations

import math

import pytest
import tomli_w

from fedgen.artifacts import SITE_STATE_DIR, RunDir
from fedgen.clients.app import with_node_policy
from fedgen.clients.local import PolicyRefused, check_policy, train_site
from fedgen.config import load_config
from fedgen.data.check import check_site
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import load_site
from fedgen.errors import FedgenError
from fedgen.modalities import get_modality
from fedgen.privacy.plan import PrivacyPlan
from fedgen.simulations.engine import simulate
from fedgen.site_policy import SitePolicy, policy_from_settings

TINY = {
    "modality": "text",
    "federation.rounds": 1,
    "federation.sites": 2,
    "text.tiny_hidden_size": 16,
    "text.tiny_layers": 1,
    "text.batch_size": 8,
}


def plan(sigma, delta=1e-3):
    return PrivacyPlan(noise_multiplier=sigma, delta=delta, sample_rate=0.1, steps_per_round=10, budget=8.0)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_demo_consortium(
        tmp_path_factory.mktemp("policy") / "sites",
        sites=2,
        seed=3,
        images_per_site=10,
        texts_per_site=40,
        resolution=16,
    )


def test_the_default_policy_refuses_no_dp_and_a_sigma_below_its_floor():
    policy = SitePolicy()
    with pytest.raises(PolicyRefused, match=r"^site-1 refuses to train text: its policy requires DP .*ε = inf"):
        check_policy(policy, plan(None), site="site-1", modality="text", n_train=100)
    with pytest.raises(PolicyRefused, match=r"σ = 0.1 is below its floor min_noise_multiplier = 0.3$"):
        check_policy(policy, plan(0.1), site="site-1", modality="text", n_train=100)
    with pytest.raises(PolicyRefused, match=r"δ = 0.005 is above its max_delta = 0.001$"):
        check_policy(policy, plan(1.0, delta=0.005), site="site-1", modality="text", n_train=100)
    check_policy(policy, plan(1.0), site="site-1", modality="text", n_train=100)  # δ = 1/(10 n): accepted


def test_a_site_that_allows_no_dp_trains_without_it():
    policy = policy_from_settings({"require_dp": False})
    check_policy(policy, plan(None), site="site-1", modality="text", n_train=100)
    with pytest.raises(PolicyRefused, match="max_delta = 1e-05"):
        check_policy(policy_from_settings({"max_delta": 1e-5}), plan(1.0), site="s", modality="text", n_train=100)


def test_site_toml_policy_is_checked_and_loaded(sites, tmp_path):
    config = load_config(None, TINY)
    toml = sites[0] / "site.toml"
    original = toml.read_text()
    try:
        toml.write_text(original + 'min_noise_multiplier = -1\naudit_queries = ["histograms"]\nrequire_dp = 1\n')
        problems = check_site(sites[0], config.data, modalities=("text",)).problems
        assert [p.split(": ", 1)[1] for p in problems] == [
            "min_noise_multiplier = -1 must be a number of at least 0",
            "audit_queries: unknown histograms (known: audit)",
            "require_dp = 1 must be true or false",
        ]
        toml.write_text(original + "min_noise_multiplier = 0.8\naudit_answers = 1\nepsilon_budget = 2.0\n")
        site = load_site(sites[0], config.data, modalities=("text",))
        assert site.policy == SitePolicy(min_noise_multiplier=0.8, audit_answers=1, epsilon_budget=2.0)
        assert site.epsilon_budget == 2.0
        # `fedgen client` flags reach the ClientApp in the node config and override site.toml
        site = with_node_policy(site, {"data-path": "x", "epsilon_budget": 1.0, "require_dp": False})
        assert site.epsilon_budget == 1.0 and not site.policy.require_dp and site.policy.min_noise_multiplier == 0.8
        with pytest.raises(FedgenError, match="node config: audit_answers = -2 must be a whole number"):
            with_node_policy(site, {"audit_answers": -2})
    finally:
        toml.write_text(original)


@pytest.mark.parametrize("overrides", [{"privacy.epsilon": math.inf}, {"privacy.noise_multiplier": 0.05}])
def test_a_default_policy_site_refuses_to_train_before_it_trains(sites, overrides):
    config = load_config(None, {**TINY, **overrides})
    site = load_site(sites[0], config.data, modalities=("text",))
    modality = get_modality("text", config, work_dir=sites[0] / SITE_STATE_DIR)
    with pytest.raises(PolicyRefused, match="refuses to train text"):
        train_site(modality, site, {}, histories={}, seed=0)


@pytest.mark.e2e
def test_a_simulated_consortium_of_default_policy_sites_refuses_a_run_without_dp(sites, tmp_path):
    run = RunDir.create(tmp_path / "runs", load_config(None, {**TINY, "privacy.epsilon": math.inf}), "no-dp")
    with pytest.raises(FedgenError) as caught:
        simulate(run, sites)
    message = str(caught.value)
    assert "\n" not in message
    assert "refuses to train text: its policy requires DP and the run asks for ε = inf" in message
    assert run.completed_rounds("text") == []


def test_policy_file_round_trips_through_toml(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps({"require_dp": False, "audit_queries": []}))
    import tomllib

    assert policy_from_settings(tomllib.loads(path.read_text())) == SitePolicy(require_dp=False, audit_queries=())


def test_client_flags_reach_the_clientapp_in_the_node_config(tmp_path):
    from flwr.common.config import parse_config_args

    from fedgen.clients.deploy import supernode_command

    key, ca = tmp_path / "site-1.key", tmp_path / "ca.crt"
    command = supernode_command(
        server="127.0.0.1:9092",
        site_dir=tmp_path,
        key=key,
        ca=ca,
        runtime_port=9999,
        policy={"require_dp": False, "min_noise_multiplier": 0.25, "audit_answers": 1},
    )
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert node_config == {
        "data-path": str(tmp_path.resolve()),
        "require_dp": False,
        "min_noise_multiplier": 0.25,
        "audit_answers": 1,
    }
    assert policy_from_settings(node_config) == SitePolicy(require_dp=False, min_noise_multiplier=0.25, audit_answers=1)


def test_queries_that_arrive_together_are_answered_no_more_often_than_the_policy_allows(tmp_path, monkeypatch):
    """Each query reads the answer count, then writes it: without a lock, queries sent at once all
    read 0 and are all answered. Writes are slowed here so that they overlap."""
    import threading
    import time
    from types import SimpleNamespace

    from fedgen.clients import site_audit

    write = site_audit.write_json

    def slow_write(path, record):
        time.sleep(0.05)
        write(path, record)

    monkeypatch.setattr(site_audit, "write_json", slow_write)
    site = SimpleNamespace(policy=SitePolicy(audit_answers=2))
    outcomes = []

    def ask():
        try:
            site_audit._count_answer(
                site, tmp_path, modality="text", query="audit", model="m", synthetic="s", n_synthetic=100
            )
            outcomes.append("answered")
        except FedgenError:
            outcomes.append("refused")

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["answered"] * 2 + ["refused"] * 6
