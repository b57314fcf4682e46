"""DP overhead of one site's local training: examples/s and peak memory, DP vs non-DP.

Each configuration runs in a fresh subprocess so its peak resident memory is its own; the
cases take turns ``--repeats`` times and each reports its median run, because one epoch of a few
steps on a shared 2-core machine moves by ±10% between runs.
    python -m benchmarks.dp_overhead [--steps 6] [--repeats 3] [--threads 2] [--image-batch 64] [--modality image]
        [--text-base tiny-random-llama] [--text-lora q_proj,v_proj] [--text-lora-layers N]

Text runs on the default base model (SmolLM2-135M-Instruct) and demo notes unless
``--text-base tiny-random-llama`` (random 300-letter texts, LoRA on q/v/lm_head, as the tiny
model's figures were measured); ``--text-lora`` and ``--text-lora-layers`` compare LoRA targets.

"image DP (ghost)" is Opacus' ghost clipping with fedgen's Conv2d norm sampler
(fedgen.privacy.conv_samplers): per-example gradient norms only, never the per-example
gradients. "image DP (hooks)" uses fedgen's Conv2d grad sampler from the same module.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = {
    # name: (modality, noise multiplier or None, grad_sample_mode)
    "image non-DP": ("image", None, "hooks"),
    "image DP (hooks)": ("image", 1.0, "hooks"),
    "image DP (ghost)": ("image", 1.0, "ghost"),
    "text non-DP": ("text", None, "hooks"),
    "text DP (hooks)": ("text", 1.0, "hooks"),
    "text DP (ghost)": ("text", 1.0, "ghost"),
}
TEXT_LENGTH = 300  # bytes, about a demo note
MODALITIES = ("image", "text")


def _dataset(modality, batch_size: int, steps: int, text: dict):
    import tempfile
    from pathlib import Path

    import torch
    from torch.utils.data import TensorDataset

    from fedgen.config import RunConfig
    from fedgen.modalities import get_modality

    tiny = text["base_model"] == "tiny-random-llama"
    if tiny:
        text = {"target_modules": ["q_proj", "v_proj", "lm_head"], "max_length": 640, **text}
    config = RunConfig.model_validate({"text": text})
    work = Path(tempfile.mkdtemp())
    task = get_modality(modality, config, work_dir=work)
    n = batch_size * steps
    if modality == "image":
        c, r = config.image.channels, config.image.resolution
        data = TensorDataset(torch.rand(n, c, r, r) * 2 - 1, torch.randint(0, 5, (n,)))
    else:
        from fedgen.models.text import encode_examples

        if tiny:
            gen = torch.Generator().manual_seed(0)
            texts = [
                "".join(chr(97 + int(b)) for b in torch.randint(0, 26, (TEXT_LENGTH,), generator=gen)) for _ in range(n)
            ]
            records = [("Anxiety", t) for t in texts]
        else:
            from fedgen.data.demo import make_demo_consortium
            from fedgen.files import read_text_records

            (site,) = make_demo_consortium(work / "sites", sites=1, seed=0, images_per_site=5, texts_per_site=n)
            records = [(r["label"], r["text"]) for r in read_text_records(site / "texts.jsonl")][:n]
        data = encode_examples(task.tokenizer(), records, prompts=task.prompts(), max_length=config.text.max_length)
    return task, data, getattr(config, modality)


def measure(name: str, steps: int, threads: int, image_batch: int, text: dict) -> dict:
    import torch

    from fedgen.training import train_local

    torch.set_num_threads(threads)
    modality, sigma, mode = CASES[name]
    task, data, section = _dataset(modality, image_batch if modality == "image" else 16, steps + 1, text)
    batch = section.batch_size if modality == "text" else image_batch
    model = task.build_model()
    loss = task.per_example_loss()
    common = dict(epochs=1, batch_size=batch, lr=1e-3, noise_multiplier=sigma, max_grad_norm=1.0, delta=1e-5, seed=0)
    if sigma is not None:
        common["grad_sample_mode"] = mode
    start, cpu_start = time.perf_counter(), time.process_time()
    result = train_local(model, data, loss, **common)
    seconds = time.perf_counter() - start
    return {
        "case": name,
        "examples_per_s": result.num_examples / seconds,
        # CPU time is what a loaded machine distorts least (wall time counts the waits)
        "cpu_s_per_example": (time.process_time() - cpu_start) / result.num_examples,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": batch,
    }


def _median_run(case_runs: list[dict]) -> dict:
    """The case's median throughput and median peak memory over its runs."""
    return {
        **case_runs[0],
        "examples_per_s": statistics.median(run["examples_per_s"] for run in case_runs),
        "cpu_s_per_example": statistics.median(run["cpu_s_per_example"] for run in case_runs),
        "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in case_runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-batch", type=int, default=64)
    parser.add_argument("--modality", choices=MODALITIES, help="only this modality's cases")
    parser.add_argument("--text-base", default="smollm2-135m-instruct")
    parser.add_argument("--text-lora", help="LoRA target modules, comma-separated (default: the model's default)")
    parser.add_argument("--text-lora-layers", type=int, help="LoRA on the top N layers only")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text_options = ["--text-base", args.text_base]
    text = {"base_model": args.text_base}
    if args.text_lora:
        text_options += ["--text-lora", args.text_lora]
        text["target_modules"] = args.text_lora.split(",")
    if args.text_lora_layers:
        text_options += ["--text-lora-layers", str(args.text_lora_layers)]
        text["lora_layers"] = args.text_lora_layers
    if args.case:
        print(json.dumps(measure(args.case, args.steps, args.threads, args.image_batch, text)))
        return
    modalities = (args.modality,) if args.modality else MODALITIES
    names = [name for name, case in CASES.items() if case[0] in modalities]
    runs = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    name,
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                    "--image-batch",
                    str(args.image_batch),
                    *text_options,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {name: _median_run(case_runs) for name, case_runs in runs.items()}
    print(f"{'case':<20} {'batch':>5} {'ex/s':>8} {'CPU s/ex':>9} {'peak RSS MB':>12}")
    for row in rows.values():
        print(
            f"{row['case']:<20} {row['batch']:>5} {row['examples_per_s']:>8.2f} {row['cpu_s_per_example']:>9.3f} {row['peak_rss_mb']:>12.0f}"
        )
    for modality in modalities:
        base = rows[f"{modality} non-DP"]
        for name, row in rows.items():
            if name.startswith(modality) and "non-DP" not in name:
                print(
                    f"{name}: time x{base['examples_per_s'] / row['examples_per_s']:.2f} "
                    f"(CPU x{row['cpu_s_per_example'] / base['cpu_s_per_example']:.2f}), "
                    f"memory x{row['peak_rss_mb'] / base['peak_rss_mb']:.2f} vs non-DP"
                )


if __name__ == "__main__":
    main()
