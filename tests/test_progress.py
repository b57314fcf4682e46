"""Long work shows progress: a site's round (round, epoch, steps), sampling with an estimate."""

import io
import json
import threading
import time
from dataclasses import asdict

from rich.console import Console

import fedgen.site_progress
from fedgen.artifacts import SITE_STATE_DIR
from fedgen.cli.site_watch import showing_site_progress
from fedgen.clients.local import train_site
from fedgen.config import load_config
from fedgen.data.demo import make_demo_consortium
from fedgen.data.site import load_site
from fedgen.logs import progress_bar
from fedgen.modalities import ImageModality
from fedgen.site_progress import SiteProgress, progress_path, progress_writer, read_progress

TINY = {
    "image.resolution": 16,
    "image.block_out_channels": [16, 32],
    "image.norm_num_groups": 4,
    "image.batch_size": 8,
    "image.local_epochs": 2,
    "privacy.epsilon": 4.0,
}


def _log_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200), out


def test_the_progress_file_follows_epochs_and_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(fedgen.site_progress, "WRITE_EVERY", 0.0)
    path = progress_path(tmp_path, "image")
    progress = progress_writer(path, site="site-1", modality="image", round=2, epochs=3, steps_per_epoch=4)
    assert read_progress(path) == SiteProgress("site-1", "image", 2, 1, 3, 0, 12)
    progress(5, 0.1)
    assert (read_progress(path).epoch, read_progress(path).step) == (2, 5)
    progress(12, 0.1)
    assert read_progress(path).epoch == 3 and read_progress(path).done
    assert "loss" not in json.loads(path.read_text())  # under DP the loss stays private
    assert read_progress(tmp_path / "missing.json") is None


def test_a_site_round_reports_its_planned_epochs_and_steps(tmp_path):
    site_dir = make_demo_consortium(
        tmp_path / "sites", sites=1, seed=3, images_per_site=30, texts_per_site=20, resolution=16
    )[0]
    config = load_config(None, TINY)
    site = load_site(site_dir, config.data, modalities=("image",), channels=1)
    task = ImageModality(config, work_dir=tmp_path)
    path = progress_path(tmp_path, "image")
    planned = {}

    def progress_for(epochs, steps_per_epoch):
        planned.update(epochs=epochs, steps_per_epoch=steps_per_epoch)
        return progress_writer(
            path, site=site.name, modality="image", round=1, epochs=epochs, steps_per_epoch=steps_per_epoch
        )

    update = train_site(task, site, task.get_state(task.build_model()), histories={}, seed=0, progress_for=progress_for)
    n_train = len(task.datasets(site)[0])
    assert planned == {"epochs": 2, "steps_per_epoch": -(-n_train // 8)}
    last = read_progress(path)
    assert last.step == last.steps == update.metrics["steps"] == 2 * planned["steps_per_epoch"]
    assert last.epoch == 2


def test_sampling_progress_in_a_log_gives_counts_and_an_estimate():
    console, out = _log_console()
    with progress_bar(True, total=100, description="sampling images", unit="images", console=console) as advance:
        for _ in range(10):
            advance(10)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sampling images: 10/100 images in 0:00, ~0:00 left")
    assert lines[-1].startswith("sampling images: 100/100 images in")
    assert len(lines) == 10  # one line per tenth


def test_simulate_prints_a_line_whenever_a_site_starts_an_epoch(tmp_path):
    sites = [tmp_path / "site-1", tmp_path / "site-2"]
    stale = progress_path(sites[0] / SITE_STATE_DIR, "image")
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps(asdict(SiteProgress("site-1", "image", 9, 1, 1, 0, 1))))  # an earlier run's
    console, out = _log_console()

    def train():
        for step in range(0, 7):
            for number, root in enumerate(sites, start=1):
                path = progress_path(root / SITE_STATE_DIR, "image")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(
                    json.dumps(asdict(SiteProgress(f"site-{number}", "image", 1, step // 3 + 1, 2, step, 6)))
                )
            time.sleep(0.6)

    with showing_site_progress(sites, ["image"], console):
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    lines = out.getvalue().splitlines()
    assert "site-1 image round 1: epoch 1/2 (0/6 steps)" in lines
    assert any(line.startswith("site-2 image round 1: epoch 2/2 (") for line in lines)
    assert not any("round 9" in line for line in lines)  # the stale file was removed first
    assert len([line for line in lines if line.startswith("site-1")]) == 2  # one line per epoch


def test_a_round_of_one_epoch_prints_a_line_per_quarter(tmp_path):
    site = tmp_path / "site-1"
    console, out = _log_console()

    def train():
        path = progress_path(site / SITE_STATE_DIR, "text")
        path.parent.mkdir(parents=True, exist_ok=True)
        for step in (0, 1, 3, 5, 8):
            path.write_text(json.dumps(asdict(SiteProgress("site-1", "text", 2, 1, 1, step, 10))))
            time.sleep(0.6)

    with showing_site_progress([site], ["text"], console):
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    assert out.getvalue().splitlines() == [f"site-1 text round 2: epoch 1/1 ({step}/10 steps)" for step in (0, 3, 5, 8)]
