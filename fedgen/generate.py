"""Synthetic data from a run's checkpoint: images per class (+ a contact sheet) or texts; and
the readers of what it wrote."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from fedgen.artifacts import NOTE_TOKENS_KEY, RunDir
from fedgen.data.check import IMAGE_SUFFIXES
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir, atomic_file, read_text_records, write_text
from fedgen.logs import progress_bar
from fedgen.modalities import ImageModality, TextModality

__all__ = ["generate_images", "generate_texts", "choose_classes", "synthetic_image_files", "synthetic_text_records"]

CONTACT_SHEET_ROWS = 8  # samples per class shown on the contact sheet
# Notes decoded together, of any classes (left-padded prompts, one key-value cache): on two CPU
# cores one batch of 100 took 0.6x the time of five batches of 20, so a demo's notes go in one.
GENERATE_BATCH = 100


def choose_classes(all_classes: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    if not wanted:
        return list(all_classes)
    unknown = [c for c in wanted if c not in all_classes]
    if unknown:
        raise FedgenError(f"unknown class {unknown[0]!r}; the run's classes are {', '.join(all_classes)}")
    return list(dict.fromkeys(wanted))


def generate_images(
    run: RunDir,
    *,
    per_class: int,
    classes: Sequence[str] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    server_round: int | None = None,
    seed: int = 0,
) -> Path:
    """Write synthetic/images/<class>/NNNNN.png and synthetic/contact-sheet.png; return the folder."""
    from fedgen.models.diffusion import contact_sheet, sample_images, to_uint8

    config = run.config()
    all_classes = config.data.image_classes
    chosen = choose_classes(all_classes, classes)
    unet = ImageModality(config, work_dir=run.base_models).load(run.sampling_checkpoint("image", server_round))
    generator = torch.Generator().manual_seed(seed)
    target = run.synthetic / "images"
    samples: dict[str, torch.Tensor] = {}
    total = per_class * len(chosen)
    with (
        atomic_dir(target) as tmp,
        progress_bar(True, total=total, description="sampling images", unit="images") as advance,
    ):
        for name in chosen:
            labels = torch.full((per_class,), all_classes.index(name), dtype=torch.long)
            images = sample_images(
                unet,
                labels,
                config=config.image,
                steps=steps,
                guidance=guidance,
                sampler=sampler,
                generator=generator,
                progress=advance,
            )
            samples[name] = images[:CONTACT_SHEET_ROWS]
            (tmp / name).mkdir()
            for i, pixels in enumerate(to_uint8(images)):
                Image.fromarray(pixels.squeeze()).save(tmp / name / f"{i:05d}.png")
    with atomic_file(run.synthetic / "contact-sheet.png") as sheet:
        contact_sheet(samples).save(sheet)
    return target


def generate_texts(
    run: RunDir,
    *,
    per_class: int,
    classes: Sequence[str] | None = None,
    server_round: int | None = None,
    seed: int = 0,
) -> Path:
    """Write synthetic/texts.jsonl, one {"text", "label"} per line; return its path.

    A note stops at its end-of-turn token or at ``TextModality.max_new_tokens``, fed the note
    length the checkpoint records from the sites' training replies."""
    from fedgen.models.text import decoding_steps
    from fedgen.models.text import generate_texts as sample_texts

    config = run.config()
    chosen = choose_classes(config.data.text_classes, classes)
    modality = TextModality(config, work_dir=run.base_models)
    model = modality.load(run.checkpoint("text", server_round))
    note_tokens = run.checkpoint_metrics("text", server_round).get(NOTE_TOKENS_KEY)
    tokenizer, prompts, max_new_tokens = modality.tokenizer(), modality.prompts(), modality.max_new_tokens(note_tokens)
    labels = [name for name in chosen for _ in range(per_class)]
    description = f"sampling {len(labels)} texts of at most {max_new_tokens} tokens"
    total_steps = decoding_steps(len(labels), batch_size=GENERATE_BATCH, max_new_tokens=max_new_tokens)
    with progress_bar(True, total=total_steps, description=description, unit="decoding steps") as advance:
        written = 0

        def advance_to(done: int, _total: int) -> None:
            nonlocal written
            advance(done - written)
            written = done

        texts = sample_texts(
            model,
            tokenizer,
            prompts=prompts,
            labels=labels,
            temperature=config.text.temperature,
            top_p=config.text.top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=GENERATE_BATCH,
            progress=advance_to,
        )
    lines = [json.dumps({"text": text, "label": label}) for text, label in zip(texts, labels)]
    target = run.synthetic / "texts.jsonl"
    write_text(target, "\n".join(lines) + "\n")
    return target


def _generate_first(run: RunDir, modality: str) -> FedgenError:
    return FedgenError(
        f"{run.root} has no synthetic {modality} data: run `fedgen generate {run.root} --modality {modality}` first"
    )


def synthetic_image_files(run: RunDir, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """synthetic/images/<class>/* image files (class folder order, then name) and their labels,
    indices into ``classes``; a FedgenError when there are none or a folder is not a class."""
    root = run.synthetic / "images"
    paths, labels = [], []
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name not in classes:
                raise FedgenError(f"{folder}: {folder.name!r} is not one of the run's image classes {list(classes)}")
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [classes.index(folder.name)] * len(files)
    if not paths:
        raise _generate_first(run, "image")
    return paths, labels


def synthetic_text_records(run: RunDir, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """synthetic/texts.jsonl as (texts, labels as indices into ``classes``)."""
    path = run.synthetic / "texts.jsonl"
    if not path.is_file():
        raise _generate_first(run, "text")
    texts, labels = [], []
    for number, record in enumerate(read_text_records(path), start=1):
        if record.get("label") not in classes:
            raise FedgenError(
                f"{path} line {number}: label {record.get('label')!r} is not in the class list {list(classes)}"
            )
        texts.append(record["text"])
        labels.append(classes.index(record["label"]))
    if not texts:
        raise _generate_first(run, "text")
    return texts, labels
