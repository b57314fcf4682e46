"""SHA-256 fingerprints of files: what the audit records, what a release lists and checks.

``synthetic_manifest`` is taken before the audit reads the synthetic files and recorded in the
report; ``fedgen release`` refuses any file that changed since, and writes ``MANIFEST.sha256``
(sha256sum's format) beside what it releases.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fedgen.errors import FedgenError

__all__ = ["MANIFEST_NAME", "file_sha256", "synthetic_manifest", "write_manifest"]

MANIFEST_NAME = "MANIFEST.sha256"
HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def synthetic_manifest(synthetic_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under ``synthetic_dir``, keyed by its POSIX path relative to it.

    The audit records it in ``report["synthetic"]["sha256"]`` so that ``fedgen release`` can
    refuse files that changed after they were audited.
    """
    synthetic_dir = Path(synthetic_dir)
    if not synthetic_dir.is_dir():
        return {}
    files = sorted(p for p in synthetic_dir.rglob("*") if p.is_file())
    return {p.relative_to(synthetic_dir).as_posix(): file_sha256(p) for p in files}


def write_manifest(folder: Path) -> Path:
    """``folder/MANIFEST.sha256`` in sha256sum's format, one line per file below ``folder``."""
    hashes = synthetic_manifest(folder)
    bad = [name for name in hashes if "\n" in name or "\\" in name]
    if bad:
        raise FedgenError(f"file name {bad[0]!r} cannot be listed in a sha256sum manifest (newline or backslash)")
    manifest = folder / MANIFEST_NAME
    manifest.write_text("".join(f"{digest}  {name}\n" for name, digest in hashes.items()), encoding="utf-8")
    return manifest
