"""What crosses the wire between the coordinator and the sites: run-config keys and message layouts.

Both sides import this module and nothing of each other: the ServerApps (fedgen.server) write
these layouts, the ClientApp (fedgen.clients) reads them, and the deployment engine passes the
run-config keys to Flower.

Run config (``flwr run ... --run-config key=value``; the app's declared defaults below, since
Flower accepts only declared keys). The ServerApp runs in the SuperLink's process tree and does
not inherit the caller's environment, so paths travel here, absolute.

Train messages carry ``arrays`` (the global trained state) and ``config`` (the resolved run
configuration as TOML, the modality, the server round); a site replies with its ``arrays``,
``metrics`` (ε spent and the DP-SGD parameters; of its records' content only, for text, the
coarse note length of fedgen.modalities.coarse_note_length, when it has 20 notes or more) and
its ``site`` name. Under SecAgg+ Flower's legacy ``fitins.*`` / ``fitres.*`` records carry the same content
(see fedgen.server.secagg and fedgen.clients.secagg).

Audit queries carry the run configuration, the final model's trained state, the synthetic data
and (images) the path of the Inception detector if the user chose one; replies hold aggregates only, packed
by :func:`pack_reply`: arrays in an ArrayRecord, everything else as one JSON document. A site
identifies the model and the synthetic set it is asked about by :func:`record_digest`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from fedgen.config import RunConfig, config_to_toml

__all__ = [
    "RUN_DIR_KEY",
    "POLICY_KEY",
    "INCEPTION_KEY",
    "TRAIN_RUN_CONFIG",
    "AUDIT_RUN_CONFIG",
    "TRAIN_ARRAYS",
    "TRAIN_CONFIG",
    "TRAIN_METRICS",
    "TRAIN_SITE",
    "ARRAY_KEYS",
    "SITE_KEY",
    "RELEASED_KEY",
    "LEGACY_PARAMS",
    "LEGACY_CONFIG",
    "QUERY_AUDIT",
    "CONFIG",
    "MODEL",
    "SYNTHETIC_IMAGES",
    "SYNTHETIC_TEXTS",
    "INCEPTION",
    "make_query",
    "record_digest",
    "pack_reply",
    "unpack_reply",
    "error_line",
]

# --- run config ---------------------------------------------------------------------------

RUN_DIR_KEY = "run-dir"  # the run folder, absolute
POLICY_KEY = "policy"  # the audit's policy file, absolute; empty = the shipped default policy
INCEPTION_KEY = "inception"  # the audit's Inception file, absolute, the same at every site; empty = FeatureNet
TRAIN_RUN_CONFIG = {RUN_DIR_KEY: ""}  # the training app's declared keys and defaults
AUDIT_RUN_CONFIG = {RUN_DIR_KEY: "", POLICY_KEY: "", INCEPTION_KEY: ""}  # the audit app's

# --- train messages -----------------------------------------------------------------------

TRAIN_ARRAYS = "arrays"  # ArrayRecord: the global (request) or the site's (reply) trained state
TRAIN_CONFIG = "config"  # ConfigRecord: run-config (TOML), modality, server-round, ...
TRAIN_METRICS = "metrics"  # MetricRecord: num-examples, epsilon, delta, noise-multiplier, ..., note-tokens
TRAIN_SITE = "site"  # ConfigRecord {"name": ..., RELEASED_KEY: ...}
# Every update the site released in this run, this one included, as JSON {modality: [[σ, q,
# steps], ...]}: the coordinator records any whose reply it lost (fedgen.server.strategy).
RELEASED_KEY = "released"
# SecAgg+ rounds use Flower's legacy records.
ARRAY_KEYS = "array-keys"  # config entry: legacy Parameters carry no array names
SITE_KEY = "site"  # legacy FitRes metrics carry the site name and RELEASED_KEY (the plain reply has a record)
LEGACY_PARAMS = "fitins.parameters"
LEGACY_CONFIG = "fitins.config"

# --- audit queries ------------------------------------------------------------------------

QUERY_AUDIT = "audit"  # every measure, plus per attack the exact summary and the site's histogram

# Query layout (coordinator -> site).
CONFIG = "config"  # ConfigRecord: run-config (TOML), modality, query
MODEL = "model"  # ArrayRecord: the final checkpoint's trained tensors
SYNTHETIC_IMAGES = "synthetic-images"  # ArrayRecord: "images" [N, C, H, W] in [-1, 1], "labels" [N]
SYNTHETIC_TEXTS = "synthetic-texts"  # ConfigRecord: "texts", "labels" (class indices)
INCEPTION = "inception"  # ConfigRecord: "path" of the TorchScript Inception detector for fidelity
# Reply layout (site -> coordinator).
REPLY_SUMMARY = "summary"  # ConfigRecord {"json": ...}: the reply with arrays replaced by references
REPLY_ARRAYS = "aggregates"  # ArrayRecord: the arrays, keyed by their dotted path in the reply
ARRAY_REF = "__array__"


def make_query(
    config: RunConfig,
    modality: str,
    query: str,
    *,
    model_state: dict[str, Tensor],
    synthetic_images: tuple[Tensor, Tensor] | None = None,
    synthetic_texts: tuple[Sequence[str], Sequence[int]] | None = None,
    inception: str | Path | None = None,
) -> RecordDict:
    """The content of one audit query (coordinator side)."""
    content = RecordDict(
        {
            CONFIG: ConfigRecord({"run-config": config_to_toml(config), "modality": modality, "query": query}),
            MODEL: ArrayRecord(torch_state_dict=model_state),
        }
    )
    if synthetic_images is not None:
        images, labels = synthetic_images
        content[SYNTHETIC_IMAGES] = ArrayRecord(
            array_dict={"images": Array(images.numpy()), "labels": Array(labels.numpy())}
        )
    if synthetic_texts is not None:
        texts, labels = synthetic_texts
        content[SYNTHETIC_TEXTS] = ConfigRecord({"texts": list(texts), "labels": [int(x) for x in labels]})
    if inception is not None:
        content[INCEPTION] = ConfigRecord({"path": str(inception)})
    return content


def record_digest(record: ArrayRecord | ConfigRecord) -> str:
    """SHA-256 of a record's content (keys in order): the same arrays or values, the same digest."""
    digest = hashlib.sha256()
    if isinstance(record, ArrayRecord):
        for key in sorted(record.keys()):
            digest.update(key.encode() + b"\0" + record[key].data)
    else:
        digest.update(json.dumps(dict(record), sort_keys=True).encode())
    return digest.hexdigest()


def _strip_arrays(node, path: str, arrays: dict[str, Array]):
    """The reply as JSON-able values, each numpy array replaced by {ARRAY_REF: its path}."""
    if isinstance(node, dict):
        return {k: _strip_arrays(v, f"{path}.{k}" if path else str(k), arrays) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_strip_arrays(v, f"{path}.{i}", arrays) for i, v in enumerate(node)]
    if isinstance(node, np.ndarray):
        arrays[path] = Array(np.ascontiguousarray(node))
        return {ARRAY_REF: path}
    if isinstance(node, np.generic):
        return node.item()
    return node


def pack_reply(result: dict) -> RecordDict:
    """A site's audit answer (nested dicts, lists, numbers, numpy arrays) as a RecordDict."""
    arrays: dict[str, Array] = {}
    skeleton = _strip_arrays(result, "", arrays)
    return RecordDict(
        {
            REPLY_SUMMARY: ConfigRecord({"json": json.dumps(skeleton)}),
            REPLY_ARRAYS: ArrayRecord(array_dict=arrays),
        }
    )


def unpack_reply(content: RecordDict) -> dict:
    """The inverse of pack_reply (coordinator side): arrays come back as numpy arrays."""
    arrays = content[REPLY_ARRAYS]

    def restore(node):
        if isinstance(node, dict):
            if set(node) == {ARRAY_REF}:
                return arrays[node[ARRAY_REF]].numpy()
            return {k: restore(v) for k, v in node.items()}
        if isinstance(node, list):
            return [restore(v) for v in node]
        return node

    return restore(json.loads(str(content[REPLY_SUMMARY]["json"])))


def error_line(reason: str) -> str:
    """One line from the reason of a site's error reply: in simulation the exception text
    follows "Message: " at the end of a traceback, in deployment it is wrapped in its class."""
    last = reason.rsplit("Message: ", 1)[-1]
    lines = [line.strip() for line in last.splitlines() if line.strip()]
    line = lines[-1] if lines else "no reason given"
    # A deployed SuperNode reports "<class 'module.Error'>:<'message'>"
    return re.sub(r"^<class '[^']*'>:<'", "", line).removesuffix("'>")
