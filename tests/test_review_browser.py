"""The review page in a real headless Chromium: a reviewer answers every item with clicks,
saves, and the scorer reads the file the browser downloaded; a saved file also resumes."""

import json

import pytest

from fedgen.audits.review import proportion, score_kit
from fedgen.audits.review_kit import build_kit
from tests.cdp import Chromium
from tests.test_review_kit import make_run, make_site


def radio(item: str, field: str, value) -> str:
    return f'input[data-item="{item}"][data-field="{field}"][value="{"" if value is None else value}"]'


def wait_until(browser: Chromium, expression: str, value, *, tries: int = 100) -> bool:
    for _ in range(tries):
        if browser.evaluate(expression) == value:
            return True
        browser.evaluate("new Promise(done => setTimeout(done, 50))")
    return False


@pytest.fixture
def kit(tmp_path):
    run = make_run(tmp_path / "runs")
    site = make_site(tmp_path)
    return build_kit(run.root, site, site / "review-kit", per_class=2, seed=0)


@pytest.mark.e2e
def test_a_reviewer_answers_every_item_in_chromium_and_the_saved_file_scores(tmp_path, kit):
    key = json.loads(kit.key.read_text(encoding="utf-8"))
    truth = {i: t for section in key["modalities"].values() for i, t in section["items"].items()}
    classes = {m: section["classes"] for m, section in key["modalities"].items()}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with Chromium(tmp_path / "profile") as browser:
        browser.open(kit.page.resolve().as_uri(), downloads=downloads)
        assert browser.evaluate("document.querySelectorAll('section.item').length") == len(truth) == 16
        browser.type("#reviewer", "Dr Test")
        # The plan: images judged right every time; every note called "real" (half right).
        # Readings: real items read as recorded; synthetic images read as the first class,
        # synthetic notes given no reading.
        for item, t in truth.items():
            modality = "image" if item.startswith("I-") else "text"
            source = t["source"] if modality == "image" else "real"
            if t["source"] == "real":
                reading = t["class"]
            else:
                reading = classes["image"][0] if modality == "image" else None
            for field, value in (("source", source), ("confidence", 4), ("reading", reading)):
                browser.click(radio(item, field, value))
                assert browser.evaluate(f"document.querySelector({json.dumps(radio(item, field, value))}).checked")
        assert browser.evaluate("document.getElementById('progress').textContent") == "16 of 16 items answered"
        before = len(browser.events)
        browser.click("#save")
        started = browser.wait_for("Browser.downloadWillBegin", since=before)
        browser.wait_for("Browser.downloadProgress", lambda p: p.get("state") == "completed", since=before)
        saved = downloads / started["suggestedFilename"]
        assert started["suggestedFilename"] == f"answers-Dr_Test-{kit.kit_id}.json"

        # a fresh page continues from the saved file: every answer comes back
        browser.open(kit.page.resolve().as_uri())
        browser.set_files("#resume", [saved])
        checked = "document.querySelectorAll('input[type=radio]:checked').length"
        assert wait_until(browser, checked, 3 * len(truth))  # the file is read asynchronously
        assert browser.evaluate("document.getElementById('reviewer').value") == "Dr Test"

        assert browser.problems() == []
        assert all(url.split(":", 1)[0] in ("file", "data", "blob") for url in browser.requested_urls())

    answers = json.loads(saved.read_text(encoding="utf-8"))
    assert answers["reviewer"] == "Dr Test" and answers["complete"] is True and len(answers["answers"]) == 16
    scores = score_kit(kit.root, [saved])
    image, text = (scores["modalities"][m]["reviewers"]["reviewer 1"] for m in ("image", "text"))
    assert image["detection"]["value"] == 1.0 and image["detection"]["n"] == 8
    assert text["detection"]["value"] == 0.5 and text["real_called_real"]["value"] == 1.0
    assert image["reading"]["real"]["value"] == 1.0 and text["reading"]["real"]["value"] == 1.0
    # synthetic images all read as No_DR: right only for the two generated as No_DR
    assert image["reading"]["synthetic"] == proportion(2, 4)
    assert text["reading"]["synthetic"]["value"] == 0.0
    assert image["by_confidence"]["4"]["n"] == 8
