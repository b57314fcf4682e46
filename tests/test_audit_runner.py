"""The federated audit: sites answer on their own records, the coordinator pools report.json.

One tiny run (2 sites, both modalities, 1 round of real DP training per site through
clients.local, checkpoints through server.train_app, synthetic data through fedgen.generate) and one
Flower simulation of the audit, shared by the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, RecordDict
from flwr.serverapp import Grid, ServerApp
from PIL import Image
from typer.testing import CliRunner

from fedgen.artifacts import SITE_STATE_DIR, RunDir
from fedgen.audits.inputs import prepare_inputs
from fedgen.audits.mia import attack_metrics, metrics_from_histograms
from fedgen.audits.pooling import pool_histograms
from fedgen.audits.site_answers import MIN_BIN_RECORDS, SITE_HISTOGRAM_BINS, site_histogram
from fedgen.cli import app as cli_app
from fedgen.clients.local import train_site
from fedgen.clients.site_audit import MIN_SYNTHETIC_ITEMS, answer_query
from fedgen.clients.text_audit import _candidate_secrets, text_memorisation
from fedgen.config import RunConfig
from fedgen.data.site import load_site, split_indices
from fedgen.errors import FedgenError
from fedgen.generate import generate_images
from fedgen.manifest import synthetic_manifest
from fedgen.modalities import get_modality
from fedgen.models.text import generate_texts as sample_texts
from fedgen.privacy.ledger import LedgerEntry, PrivacyLedger
from fedgen.protocol import (
    QUERY_AUDIT,
    REPLY_ARRAYS,
    REPLY_SUMMARY,
    error_line,
    make_query,
    pack_reply,
    unpack_reply,
)
from fedgen.server.audit_app import app as deployed_audit_app
from fedgen.server.train_app import save_checkpoint
from fedgen.simulations.engine import run_audit, run_on_simulated_sites
from tests.test_fidelity import LinearDetector, scripted
from tests.tiny_text import TINY_TEXT

PER_CLASS = 10  # records per class per site: 50 per site, 25 train / 25 held-out
SYNTHETIC_PER_CLASS = 4  # 20 per modality: the fewest a site counts memorisation on
SITES = ("site-a", "site-b")
CANARY_SECRET = "482913765"
CANARY_TEMPLATE = "Chart {secret}: patient seems calm today."
PLANTED_NAME = "Maria Lopez"
WORDS = "calm tired restless hopeful worried sleepless anxious steady low tense".split()


def tiny_config() -> RunConfig:
    return RunConfig.model_validate(
        {
            "modality": "both",
            "data": {"heldout_fraction": 0.5},
            "image": {
                "resolution": 16,
                "block_out_channels": [16, 32],
                "norm_num_groups": 4,
                "train_timesteps": 100,
                "sample_steps": 4,
                "batch_size": 16,
            },
            "text": {**TINY_TEXT, "max_length": 160, "max_new_tokens": 40},
            "privacy": {"epsilon": 10.0},
            "federation": {"rounds": 1, "sites": len(SITES)},
        }
    )


def note(rng: np.random.Generator, label: str) -> str:
    words = " ".join(rng.choice(WORDS, size=6))
    return f"Patient seems {label.lower()} today, {words}, follow up in {rng.integers(2, 9)} weeks."


def train_indices(config: RunConfig) -> list[int]:
    """The train split of every test site's notes (the split depends only on the labels)."""
    labels = [label for label in range(len(config.data.text_classes)) for _ in range(PER_CLASS)]
    train, _ = split_indices(labels, heldout_fraction=0.5, seed=config.data.split_seed)
    return train.tolist()


def write_site(root, name: str, config: RunConfig, seed: int) -> None:
    """PER_CLASS gray images and notes per class; a canary and a planted name in train records."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    # The module asks each site about one model more often than the default policy answers.
    (root / "site.toml").write_text(f'name = "{name}"\nheldout_fraction = 0.5\naudit_answers = 20\n')
    for label, grade in enumerate(config.data.image_classes):
        folder = root / "images" / grade
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            # Each image's brightness is drawn around its class's: the classes overlap, so the
            # audit's classifiers level off instead of creeping to their step cap.
            pixels = np.clip(rng.normal(rng.normal(40 * label + 30, 20), 20, size=(16, 16)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(folder / f"{i:03d}.png")
    records = [
        {"text": note(rng, label), "label": label} for label in config.data.text_classes for _ in range(PER_CLASS)
    ]
    canary_index, phi_index = train_indices(config)[:2]
    records[canary_index]["text"] = CANARY_TEMPLATE.format(secret=CANARY_SECRET)
    records[phi_index]["text"] = f"{PLANTED_NAME} " + records[phi_index]["text"]
    (root / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    canary = {"index": canary_index, **records[canary_index], "template": CANARY_TEMPLATE, "secret": CANARY_SECRET}
    (root / "canaries.jsonl").write_text(json.dumps(canary) + "\n")
    truth = {"index": phi_index, "entity_type": "PERSON", "start": 0, "end": len(PLANTED_NAME), "value": PLANTED_NAME}
    (root / "phi_truth.jsonl").write_text(json.dumps(truth) + "\n")


def train_one_round(run: RunDir, site_dirs, config: RunConfig) -> None:
    """Round 1 of every modality: DP training at each site, FedAvg, ledger rows, checkpoint."""
    ledger = PrivacyLedger(run.ledger_path)
    for name in config.modalities:
        server_side = get_modality(name, config, work_dir=run.base_models)
        model = server_side.build_model()
        start = server_side.get_state(model)
        updates = []
        for root in site_dirs:
            site = load_site(root, config.data, modalities=tuple(config.modalities), channels=config.image.channels)
            modality = get_modality(name, config, work_dir=root / SITE_STATE_DIR)
            update = train_site(modality, site, start, histories=ledger.histories(site.name), seed=0)
            ledger.record(
                LedgerEntry.from_metrics(site.name, name, 1, update.metrics, accountant=config.privacy.accountant)
            )
            updates.append(update.state)
        average = {k: torch.stack([u[k] for u in updates]).float().mean(0).to(start[k].dtype) for k in start}
        save_checkpoint(run, server_side, model, ArrayRecord(torch_state_dict=average), 1, ledger)


def write_synthetic_texts(run: RunDir, config: RunConfig) -> None:
    """What fedgen.generate.generate_texts writes (its progress callback takes the wrong
    number of arguments for fedgen.models.text.generate_texts at the time of writing)."""
    modality = get_modality("text", config, work_dir=run.base_models)
    model = modality.load(run.checkpoint("text"))
    lines = []
    for k, label in enumerate(config.data.text_classes):
        texts = sample_texts(
            model,
            modality.tokenizer(),
            prompts=modality.prompts(),
            labels=[label] * SYNTHETIC_PER_CLASS,
            temperature=config.text.temperature,
            top_p=config.text.top_p,
            max_new_tokens=config.text.max_new_tokens,
            seed=k,
        )
        lines += [json.dumps({"text": t, "label": label}) + "\n" for t in texts]
    (run.synthetic / "texts.jsonl").write_text("".join(lines))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(run, site folders, report) of the tiny run."""
    base = tmp_path_factory.mktemp("audit")
    config = tiny_config()
    site_dirs = [base / "sites" / name for name in SITES]
    for k, (root, name) in enumerate(zip(site_dirs, SITES)):
        write_site(root, name, config, seed=k)
    run = RunDir.create(base / "runs", config, "tiny")
    run.record_simulated_sites(site_dirs)
    train_one_round(run, site_dirs, config)
    generate_images(run, per_class=SYNTHETIC_PER_CLASS, steps=config.image.sample_steps)
    write_synthetic_texts(run, config)
    report = run_audit(run, progress=False)
    return run, site_dirs, report


@pytest.mark.e2e
def test_report_has_every_section_for_both_modalities(audited):
    _, _, report = audited
    assert set(report) == {
        "run",
        "privacy",
        "membership",
        "phi",
        "image_memorisation",
        "fidelity",
        "utility",
        "synthetic",
        "records",
        "bias",
    }
    assert report["run"]["modalities"] == ["image", "text"] and report["run"]["dp"] is True
    assert set(report["membership"]["image"]["attacks"]) == {"loss", "pia"}
    assert set(report["membership"]["text"]["attacks"]) == {"loss", "zlib", "min_k"}
    assert set(report["utility"]["image"]["configs"]) == {"real", "composite", "synthetic", "smote"}
    assert report["synthetic"]["n_images"] == SYNTHETIC_PER_CLASS * 5
    fidelity = report["fidelity"]["image"]
    assert "each site's own FeatureNet trained on its real train split" in fidelity["extractor"]
    assert fidelity["fid_name"] == "FeatureNet FID" and 0.0 <= fidelity["extractor_accuracy"] <= 1.0
    assert set(fidelity["extractor_sites"]) == set(SITES)
    # 10 real images per class at a site: too few for a per-class figure, which says so
    assert (
        fidelity["fid"] is None
        and fidelity["classes_measured"] == []
        and "no class has 20 real images" in fidelity["note"]
    )
    json.loads(json.dumps(report))  # JSON all the way down


@pytest.mark.e2e
def test_report_counts_records_per_site_and_class_for_the_bias_view(audited):
    _, _, report = audited
    classes = report["run"]["config"]["data"]["image_classes"]
    for modality in ("image", "text"):
        for site in SITES:  # half of each class's 10 records per site train
            counts = report["records"][modality][site]
            assert counts["train"] == counts["heldout"] == dict.fromkeys(counts["train"], PER_CLASS // 2)
        bias = report["bias"]["modalities"][modality]
        assert [row["site"] for row in bias["sites"]] == list(SITES) and bias["sites"][0]["train_share"] == 0.5
        assert all(row["synthetic"] == SYNTHETIC_PER_CLASS for row in bias["classes"])
        assert bias["mix"]["differs"] is False  # balanced sites, balanced synthetic set
    assert report["synthetic"]["per_class"]["image"] == dict.fromkeys(classes, SYNTHETIC_PER_CLASS)
    # per class: 2 sites x 10 real images, too few for a per-class PRDC at either site
    assert report["fidelity"]["image"]["per_class"] == {c: {"n_real": 2 * PER_CLASS} for c in classes}
    assert set(report["fidelity"]["image"]["sites"]) == set(SITES)
    assert report["fidelity"]["image"]["sites"]["site-a"]["classes_measured"] == []
    assert all(math.isfinite(s["frechet_distance"]) for s in report["fidelity"]["text"]["sites"].values())


@pytest.mark.e2e
def test_pooled_histograms_count_every_member_and_non_member(audited):
    _, _, report = audited
    for modality in ("image", "text"):
        for attack in report["membership"][modality]["attacks"].values():
            pooled = attack["pooled"]
            assert pooled["n_members"] == sum(s["n_members"] for s in attack["sites"].values()) == 50
            assert pooled["n_nonmembers"] == 50
            assert len(pooled["roc"]["fpr"]) <= 200 and pooled["roc"]["tpr"][-1] == 1.0


@pytest.mark.e2e
def test_guaranteed_epsilon_is_the_ledgers(audited):
    run, _, report = audited
    ledger = PrivacyLedger(run.ledger_path)
    for site in SITES:
        spent = report["privacy"]["sites"][site]
        assert spent["epsilon"] == ledger.site_spent(site) and spent["budget"] == 10.0
        assert spent["composition"] == "same people"
        for modality in ("image", "text"):
            entry = spent["modalities"][modality]
            (row,) = ledger.entries(site=site, modality=modality)
            assert entry["epsilon"] == row.epsilon
            assert entry["rounds"] == [{"round": 1, "epsilon": row.epsilon, "site_epsilon": row.site_epsilon}]
    assert report["privacy"]["epsilon_max"] == max(ledger.site_spent(site) for site in SITES)


@pytest.mark.e2e
def test_canary_exposure_and_memorisation_are_reported_per_site(audited):
    _, _, report = audited
    exposure = report["membership"]["text"]["canary_exposure"]
    # The canary is record 0, in the train split of both sites; at most log2(101) bits.
    assert set(exposure) == set(SITES)
    assert all(e is not None and 0.0 <= e <= math.log2(101) for e in exposure.values())
    memorisation = report["phi"]["memorisation"]
    assert memorisation["ngram_n"] == 8 and set(memorisation["sites"]) == set(SITES)


def site_query(run: RunDir, modality: str, **extra) -> RecordDict:
    """The coordinator's audit query about the run's model."""
    inputs = prepare_inputs(run)
    synthetic = {
        "image": {"synthetic_images": inputs.synthetic_images},
        "text": {"synthetic_texts": inputs.synthetic_texts},
    }
    return make_query(
        inputs.config,
        modality,
        QUERY_AUDIT,
        model_state=inputs.model_states[modality],
        **{**synthetic[modality], **extra},
    )


def site_answer(run: RunDir, root, modality: str, query: str, **extra):
    """A site's reply to a query, called directly (no Flower)."""
    assert query == QUERY_AUDIT
    return answer_query(site_query(run, modality, **extra), root, work_dir=root / SITE_STATE_DIR)


@pytest.mark.e2e
@pytest.mark.parametrize("modality", ["image", "text"])
def test_site_reply_holds_no_record(audited, modality):
    run, site_dirs, _ = audited
    root = site_dirs[0]
    reply = site_answer(run, root, modality, QUERY_AUDIT)
    texts = [json.loads(line)["text"] for line in (root / "texts.jsonl").read_text().splitlines()]
    summary = str(reply[REPLY_SUMMARY]["json"])
    assert not any(text in summary for text in texts)
    n_records, n_train = len(texts), len(texts) // 2  # the same for images
    for name in reply[REPLY_ARRAYS].keys():
        shape = reply[REPLY_ARRAYS][name].shape
        assert not {n_records, n_train} & set(shape), (name, shape)
    answer = unpack_reply(reply)
    assert answer["site"] == "site-a" and answer["n_train"] == answer["n_heldout"] == n_train
    assert set(answer["attacks"]) == ({"loss", "pia"} if modality == "image" else {"loss", "zlib", "min_k"})


@pytest.mark.e2e
def test_edges_from_the_coordinator_are_ignored_and_no_bin_singles_out_a_record(audited):
    run, site_dirs, _ = audited
    crafted = np.linspace(-20.0, 20.0, 1_000_001)  # a million bins: one record per bin
    reply = site_answer(run, site_dirs[1], "text", QUERY_AUDIT)
    content_with_edges = site_query(run, "text")
    content_with_edges["edges"] = ArrayRecord(array_dict={a: Array(crafted) for a in ("loss", "zlib", "min_k")})
    crafted_reply = answer_query(content_with_edges, site_dirs[1], work_dir=site_dirs[1] / SITE_STATE_DIR)
    for answer in (unpack_reply(reply), unpack_reply(crafted_reply)):
        for attack in answer["attacks"].values():
            histogram = attack["histogram"]
            totals = histogram["members"] + histogram["nonmembers"]
            assert len(totals) <= SITE_HISTOGRAM_BINS and totals.min() >= MIN_BIN_RECORDS
            assert histogram["members"].sum() == histogram["nonmembers"].sum() == 25
            assert np.isinf(histogram["edges"][[0, -1]]).all()
    assert unpack_reply(crafted_reply)["attacks"]["loss"]["histogram"]["edges"].tolist() == (
        unpack_reply(reply)["attacks"]["loss"]["histogram"]["edges"].tolist()
    )


@pytest.mark.e2e
def test_a_site_answers_within_its_policy_only(audited):
    run, site_dirs, _ = audited
    root = site_dirs[0]

    def refusal(content, **node_config):
        with pytest.raises(FedgenError) as raised:
            answer_query(content, root, work_dir=root / SITE_STATE_DIR, node_config=node_config)
        return str(raised.value)

    answers = json.loads((root / SITE_STATE_DIR / "audit-answers.json").read_text())["answers"]
    asked = max(n for key, n in answers.items() if "/text/" in key)
    assert refusal(site_query(run, "text"), audit_answers=asked) == (
        f"site-a: refuses to answer the text audit query again: it answered it {asked} time(s) about this model "
        f"(audit_answers = {asked})"
    )
    assert (
        refusal(site_query(run, "text"), audit_queries="")
        == "site-a: refuses the audit query: its policy answers none (audit_queries)"
    )
    # memorisation counts: on the first synthetic set only, and on no fewer than MIN_SYNTHETIC_ITEMS
    texts, labels = prepare_inputs(run).synthetic_texts
    other = site_query(run, "text", synthetic_texts=(["a new candidate", *texts[1:]], labels))
    assert (
        refusal(other)
        == "site-a: refuses a second synthetic text set for this model: it counts memorisation on the first set it was asked about only"
    )
    few = site_query(run, "text", synthetic_texts=(texts[:1], labels[:1]))
    assert (
        refusal(few)
        == f"site-a: refuses to count memorisation on 1 synthetic text items: it needs at least {MIN_SYNTHETIC_ITEMS} (generate more)"
    )


def test_missing_synthetic_data_names_the_generate_command(tmp_path):
    config = tiny_config().model_copy(update={"modality": "text"})
    run = RunDir.create(tmp_path, config, "empty")
    with pytest.raises(FedgenError, match="--modality text` first"):
        prepare_inputs(run)


def test_reply_arrays_round_trip():
    result = {"a": {"sum": np.arange(3.0), "n": np.int64(4)}, "b": [1.5, None, float("inf")]}
    back = unpack_reply(pack_reply(result))
    assert back["a"]["n"] == 4 and back["b"] == [1.5, None, float("inf")]
    np.testing.assert_array_equal(back["a"]["sum"], np.arange(3.0))


@pytest.mark.parametrize("shift", [0.3, 1.0])
def test_site_chosen_bins_keep_pooled_auc_and_tpr_close_to_exact(shift):
    rng = np.random.default_rng(0)
    sites = [(rng.normal(shift + 0.1 * k, 1, 500), rng.normal(0.1 * k, 1, 500)) for k in range(3)]
    histograms = [site_histogram(members, nonmembers) for members, nonmembers in sites]
    members, nonmembers = pool_histograms(histograms, "members"), pool_histograms(histograms, "nonmembers")
    pooled = metrics_from_histograms(members["counts"], nonmembers["counts"], members["edges"])
    exact = attack_metrics(np.concatenate([m for m, _ in sites]), np.concatenate([n for _, n in sites]))
    assert (pooled.n_members, pooled.n_nonmembers) == (1500, 1500)
    assert abs(pooled.auc - exact.auc) < 0.005
    assert abs(pooled.tpr_at_1pct_fpr - exact.tpr_at_1pct_fpr) < 0.04
    # the ε bound's counts bracket the truth: fewer members, more non-members than a threshold accuses
    scores = np.concatenate([m for m, _ in sites])
    assert all(members["surely"] <= [np.sum(scores >= t) for t in members["thresholds"]])


def test_an_outlier_record_is_not_readable_from_its_sites_histogram():
    rng = np.random.default_rng(1)
    members, nonmembers = np.r_[rng.normal(0, 1, 59), 40.0], rng.normal(0, 1, 60)
    histogram = site_histogram(members, nonmembers)
    top = histogram["members"][-1] + histogram["nonmembers"][-1]
    assert top >= MIN_BIN_RECORDS and histogram["edges"][-2] < 3.0  # its bin starts among the others


def test_canary_candidates_keep_the_secret_format():
    candidates = _candidate_secrets("AB-123x", n=50, seed=0)
    assert len(set(candidates)) == 50 and "AB-123x" not in candidates
    assert all(c[:2].isupper() and c[2] == "-" and c[3:6].isdigit() and c[6].islower() for c in candidates)


@pytest.mark.e2e
def test_memorisation_counts_only_train_split_copies(audited):
    run, site_dirs, _ = audited
    config = run.config()
    site = load_site(site_dirs[0], config.data, modalities=("text",))
    train = train_indices(config)
    heldout = sorted(set(range(len(site.texts))) - set(train))
    synthetic = [
        f"notes: Chart {CANARY_SECRET}",  # the trained canary's secret
        f"{PLANTED_NAME} came in",  # a planted name of a train record
        site.texts[train[5]],  # a whole training note: its 8-grams are copied
        site.texts[heldout[0]],  # a held-out note: never trained on, not a copy
        "nothing to see here",
    ]
    counts = text_memorisation(synthetic, site, config)
    assert counts["canary_reproductions"] == 1 and counts["planted_phi_reproductions"] == 1
    assert counts["ngram_copies"] == 1 and counts["n_synthetic"] == 5
    # Replay from what the site's detector finds in its own train notes (the truth file only scores it):
    # the canary's chart number and the planted name; the held-out note holds neither.
    assert counts["phi_replay"] == 2 and counts["phi_replay_by_kind"] == {"MEDICAL_RECORD_NUMBER": 1, "PERSON": 1}
    assert counts["phi_detector_at_site"]["PERSON"]["recall"] == 1.0


def test_a_site_error_becomes_one_line():
    reason = "<class 'RayTaskError'>:<'ray::ClientAppActor.run()\n  File x\nException ClientAppException occurred. Message: site-b: KID: 3 records, but ...'>"
    assert error_line(reason) == "site-b: KID: 3 records, but ..."
    assert error_line("site-b: plain reason") == "site-b: plain reason"
    deployed = (
        "<class 'fedgen.clients.local.PolicyRefused'>:<'site-1 refuses to train image: σ = 0.2 is below its floor'>"
    )
    assert error_line(deployed) == "site-1 refuses to train image: σ = 0.2 is below its floor"


# --- the same audit from the run config alone (what a SuperLink starts) -------------------------


def with_run_config(app: ServerApp, run_config: dict[str, str]) -> ServerApp:
    """Start ``app`` with a run config, as a SuperLink does (run_simulation leaves it empty)."""
    outer = ServerApp()

    @outer.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        app(grid, context)

    return outer


@pytest.mark.e2e
def test_the_deployed_server_app_audits_from_its_run_config_alone(audited, tmp_path):
    """Policy and Inception detector both come through the run config."""
    run, site_dirs, simulated = audited
    strict = tmp_path / "strict.toml"
    strict.write_text(
        (Path(__file__).parents[1] / "audits" / "policy.toml")
        .read_text()
        .replace("synthetic_to_real_ratio_min = 0.5", "synthetic_to_real_ratio_min = 1000.0")
    )
    detector = scripted(tmp_path, LinearDetector())
    run_config = {"run-dir": str(run.root), "policy": str(strict), "inception": str(detector)}
    run_on_simulated_sites(with_run_config(deployed_audit_app, run_config), site_dirs)

    report = json.loads((run.audit / "report.json").read_text())
    assert set(report) == set(simulated) | {"gate"}
    assert report["membership"] == json.loads(json.dumps(simulated["membership"]))
    assert report["privacy"] == json.loads(json.dumps(simulated["privacy"]))
    assert report["phi"]["memorisation"] == simulated["phi"]["memorisation"]
    assert report["synthetic"]["sha256"] == synthetic_manifest(run.synthetic)
    # The policy came through the run config: no synthetic data is 1000 times as useful as real.
    assert report["gate"]["policy"] == str(strict) and report["gate"]["passed"] is False
    failed = {c["name"] for c in report["gate"]["checks"] if not c["passed"]}
    assert {"utility.image.synthetic_to_real_ratio", "utility.text.synthetic_to_real_ratio"} <= failed
    html = (run.audit / "report.html").read_text()
    assert "Membership inference" in html
    # Fidelity in the detector's 2048-d space, named as such.
    fidelity = report["fidelity"]["image"]
    assert str(detector) in fidelity["extractor"] and fidelity["fid_name"] == "Inception FID"
    assert "Inception FID" in html and str(detector) in html
    # Near copies keep each site's FeatureNet: the memorisation check does not move with the extractor.
    assert report["image_memorisation"] == json.loads(json.dumps(simulated["image_memorisation"]))


def test_the_deployed_audit_app_without_a_run_folder_is_one_line():
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"policy": ""})
    with pytest.raises(FedgenError, match="no run folder: pass run-dir in the run config"):
        deployed_audit_app(None, context)


@pytest.mark.e2e
def test_a_site_without_the_inception_file_answers_with_one_line(audited, tmp_path):
    run, site_dirs, _ = audited
    missing = tmp_path / "inception.pt"
    with pytest.raises(FedgenError) as raised:
        site_answer(run, site_dirs[0], "image", QUERY_AUDIT, inception=missing)
    message = str(raised.value)
    assert message == f"site-a: Inception file not found: {missing} (fedgen never downloads weights)"
    assert error_line(f"Exception ClientAppException occurred. Message: {message}") == message


def test_cli_refuses_a_missing_inception_file_before_anything_starts(tmp_path):
    run = RunDir.create(tmp_path / "runs", tiny_config(), "r1")
    missing = tmp_path / "inception.pt"
    result = CliRunner().invoke(cli_app, ["audit", str(run.root), "--inception", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: Inception file not found: {missing} (fedgen never downloads weights)"
    ]
    assert not run.audit.exists()


def test_audit_checks_its_inputs_before_asking_a_site_and_writes_nothing(tmp_path):
    config = tiny_config().model_copy(update={"modality": "text"})
    run = RunDir.create(tmp_path / "runs", config, "untrained")
    run.synthetic.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"note {k}", "label": config.data.text_classes[0]}) for k in range(20)]
    (run.synthetic / "texts.jsonl").write_text("\n".join(lines) + "\n")
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    result = CliRunner().invoke(cli_app, ["audit", str(run.root)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: {run.root} has no privacy ledger (ledger.sqlite): train it before auditing it"
    ]
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before  # no empty ledger, no audit folder
    PrivacyLedger(run.ledger_path).record(
        LedgerEntry(
            site="site-a",
            modality="text",
            round=1,
            release=1,
            site_epsilon=1.0,
            epsilon=1.0,
            delta=1e-3,
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=10,
            num_examples=50,
            loss=None,
        )
    )
    result = CliRunner().invoke(cli_app, ["audit", str(run.root)])
    assert result.output.strip().splitlines() == [f"error: {run.root} has no complete text checkpoint"]
    assert not run.audit.exists()


def test_the_privacy_section_gives_each_sites_total_over_its_models_first(tmp_path):
    from fedgen.audits.pooling import _privacy

    config = RunConfig(modality="both")
    run = RunDir.create(tmp_path / "runs", config, "r1")
    ledger = PrivacyLedger(run.ledger_path)
    for modality, site_epsilon, epsilon in (("image", 4.0, 4.0), ("text", 7.5, 4.2)):
        ledger.record(LedgerEntry("site-1", modality, 1, 1, site_epsilon, epsilon, 1e-4, 1.1, 0.1, 10, 100, None))
    ledger.record(LedgerEntry("site-2", "image", 1, 1, None, None, 1e-4, 1.1, 0.1, 10, 100, None, lost=True))
    ledger.record(
        LedgerEntry("site-2", "image", 1, 2, 6.0, 6.0, 1e-4, 1.1, 0.1, 10, 100, None, composition="different people")
    )
    section = _privacy(run, config, {"site-1": 8.0})
    one, two = section["sites"]["site-1"], section["sites"]["site-2"]
    assert (one["epsilon"], one["budget"], one["composition"]) == (7.5, 8.0, "same people")
    assert one["modalities"]["text"]["rounds"] == [{"round": 1, "epsilon": 4.2, "site_epsilon": 7.5}]
    assert (two["epsilon"], two["budget"], two["composition"]) == (6.0, 10.0, "different people")
    assert len(two["modalities"]["image"]["rounds"]) == 1  # the lost update has no ε of its own to show
    assert section["epsilon_max"] == 7.5 and section["accountant"] == "rdp"
    assert "NOT a cryptographically secure generator" in section["noise"]
