"""A text consortium with one small site: the audit reports every figure it can and marks the rest.

Two sites train the tiny random Llama for one DP round; the small one holds 16 notes (8 held
out), too few for any aggregate over its held-out notes (the utility classifiers) or over all
its notes (the embedding statistics, the attack histograms). Each site answers its audit query
directly (no Flower), the coordinator pools and the gate decides.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from fedgen.artifacts import SITE_STATE_DIR, RunDir
from fedgen.audits.fidelity import NOT_MEASURABLE, not_measurable
from fedgen.audits.gate import load_policy, record_decision
from fedgen.audits.inputs import prepare_inputs
from fedgen.audits.pooling import assemble_report
from fedgen.audits.report import write_report
from fedgen.clients.site_audit import answer_query
from fedgen.config import RunConfig
from fedgen.generate import generate_texts
from fedgen.manifest import synthetic_manifest
from fedgen.protocol import QUERY_AUDIT, make_query, unpack_reply
from tests.test_audit_runner import train_one_round
from tests.tiny_text import TINY_TEXT

CLASSES = ["Normal", "Anxiety"]
PER_CLASS = {"site-big": 30, "site-small": 8}  # half held out: 30 and 8 held-out notes
SMALL = "site-small"
WORDS = "calm tired restless hopeful worried sleepless steady low tense".split()

pytestmark = pytest.mark.e2e  # the whole audit path, train to HTML report (Presidio alone loads for ~20 s)


def config() -> RunConfig:
    return RunConfig.model_validate(
        {
            "modality": "text",
            "data": {"text_classes": CLASSES, "heldout_fraction": 0.5},
            "text": {**TINY_TEXT, "max_length": 128, "max_new_tokens": 16},
            "privacy": {"epsilon": 10.0},
            "federation": {"rounds": 1, "sites": len(PER_CLASS)},
        }
    )


def write_site(root, name: str, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "site.toml").write_text(f'name = "{name}"\nheldout_fraction = 0.5\n')
    records = [
        {"text": f"Patient seems {label.lower()}, {' '.join(rng.choice(WORDS, size=4))}.", "label": label}
        for label in CLASSES
        for _ in range(per_class)
    ]
    (root / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(the sites' answers, the report with the gate's decision, the audit's inputs)."""
    base = tmp_path_factory.mktemp("small-site")
    run_config = config()
    site_dirs = [base / "sites" / name for name in PER_CLASS]
    for k, (root, (name, per_class)) in enumerate(zip(site_dirs, PER_CLASS.items())):
        write_site(root, name, per_class, seed=k)
    run = RunDir.create(base / "runs", run_config, "small")
    train_one_round(run, site_dirs, run_config)
    generate_texts(run, per_class=10)  # 20: the fewest a site counts memorisation on
    inputs = prepare_inputs(run)
    query = make_query(
        run_config,
        "text",
        QUERY_AUDIT,
        model_state=inputs.model_states["text"],
        synthetic_texts=inputs.synthetic_texts,
    )
    answers = [unpack_reply(answer_query(query, root, work_dir=root / SITE_STATE_DIR)) for root in site_dirs]
    report = assemble_report(inputs, {"text": answers})
    return answers, record_decision(report, load_policy(), audited_files=synthetic_manifest(run.synthetic)), inputs


def site(answers: list[dict], name: str) -> dict:
    return next(a for a in answers if a["site"] == name)


def test_the_small_site_answers_counts_and_why_instead_of_figures(audited):
    answers, _, _ = audited
    small = site(answers, SMALL)
    assert (small["n_train"], small["n_heldout"]) == (8, 8)
    assert small["utility"] == not_measurable(8, "held-out records")
    assert small["utility"][NOT_MEASURABLE] == "not measurable at this site: 8 held-out records, needs 20"
    assert small["attacks"][NOT_MEASURABLE] == "not measurable at this site: 16 train and held-out notes, needs 20"
    assert small["fidelity"]["embedding_stats"] == not_measurable(16, "notes")
    assert small["memorisation"]["n_synthetic"] == 20  # what needs no aggregate of its notes is answered
    assert small["canary_exposure"]["n_canaries"] == 0
    big = site(answers, "site-big")
    assert NOT_MEASURABLE not in big["utility"] and NOT_MEASURABLE not in big["attacks"]


def test_pooled_figures_come_from_the_sites_that_measured_them_and_name_the_small_one(audited):
    answers, report, _ = audited
    why = site(answers, SMALL)["utility"][NOT_MEASURABLE]
    utility = report["utility"]["text"]
    assert utility["not_measured"] == {SMALL: why}
    assert utility["sites"][SMALL] == {"note": why}
    assert utility["configs"]["real"]["n_test"] == 30  # the big site's held-out notes only
    assert f"{SMALL}: {why}" in utility["note"]
    membership = report["membership"]["text"]
    assert set(membership["not_measured"]) == {SMALL}
    assert membership["attacks"]["loss"]["pooled"]["n_nonmembers"] == 30
    assert set(membership["attacks"]["loss"]["sites"]) == {"site-big"}
    fidelity = report["fidelity"]["text"]
    assert fidelity["frechet_distance"] is not None
    assert fidelity["sites"][SMALL] == {"note": "not measurable at this site: 16 notes, needs 20"}


def test_the_gate_names_the_small_site_in_every_check_pooled_without_it(audited):
    _, report, _ = audited
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    ratio = checks["utility.text.synthetic_to_real_ratio"]
    assert f"pooled without {SMALL}: not measurable at this site: 8 held-out records, needs 20" in ratio["detail"]
    auc = checks["membership.text.loss.auc"]
    assert auc["value"] is not None
    assert f"pooled without {SMALL}: not measurable at this site: 16 train and held-out notes" in auc["detail"]


def test_a_figure_no_site_could_measure_fails_its_check_with_the_reason(audited, tmp_path):
    """Every site too small for the utility classifiers and the attacks: those checks fail, saying why."""
    answers, _, inputs = audited
    small = copy.deepcopy(answers)
    for answer, heldout in zip(small, (12, 8)):  # as if the big site held out 12 notes
        answer["utility"] = not_measurable(heldout, "held-out records")
        answer["attacks"] = not_measurable(2 * heldout, "train and held-out notes")
    report = record_decision(assemble_report(inputs, {"text": small}), load_policy(), audited_files={})
    assert report["gate"]["passed"] is False
    checks = {c["name"]: c for c in report["gate"]["checks"]}
    ratio = checks["utility.text.synthetic_to_real_ratio"]
    assert ratio["passed"] is False and ratio["value"] is None
    assert "was not measured: site-big: not measurable at this site: 12 held-out records, needs 20" in ratio["detail"]
    assert f"{SMALL}: not measurable at this site: 8 held-out records, needs 20" in ratio["detail"]
    membership = checks["membership.text"]
    assert membership["passed"] is False
    assert f"{SMALL}: not measurable at this site: 16 train and held-out notes, needs 20" in membership["detail"]
    _, html_path = write_report(tmp_path / "audit", report)
    assert "site-big: not measurable at this site: 12 held-out records, needs 20" in html_path.read_text(
        encoding="utf-8"
    )


def test_the_html_report_shows_the_small_sites_marks(audited, tmp_path):
    _, report, _ = audited
    _, html_path = write_report(tmp_path / "audit", report)
    html = html_path.read_text(encoding="utf-8")
    assert f"{SMALL}: not measurable at this site: 8 held-out records, needs 20" in html
    assert f"{SMALL}: not measurable at this site: 16 notes, needs 20" in html
