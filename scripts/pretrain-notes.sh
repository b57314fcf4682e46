#!/usr/bin/env bash
# The recipe of the text adapter fedgen ships as fedgen:public-notes-smollm2: 4,000 public
# teaching-case notes (`fedgen demo-public --notes`, seed 1000: fedgen.data.public_notes, worded
# apart from the demo sites' notes, no PHI), then `fedgen pretrain --modality text` on the default
# text settings (SmolLM2-135M-Instruct, q/v LoRA of rank 8 on the top 10 layers, the default class
# prompt): 3 epochs of batch 16 = 750 steps, Adam 2e-3, seed 0, on two threads (the bytes depend
# on the thread count and the CPU). About 40 minutes on an idle 2-core machine.
# Prints the adapter's SHA-256 and the record fedgen/models/pretrained.py keeps in SHIPPED; to
# ship, copy OUT/public-notes-smollm2 to fedgen/checkpoints/ (0.6 MB of float32 weights).
#   bash scripts/pretrain-notes.sh [OUT]      (default OUT: runs/pretrain-notes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pretrain-notes}
FEDGEN=${FEDGEN:-.venv/bin/fedgen}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=2
mkdir -p "$OUT"
cat > "$OUT/notes.toml" <<'TOML'
modality = "text"
TOML
$FEDGEN demo-public "$OUT/public" --notes 4000 --seed 1000
$FEDGEN pretrain --modality text --public "$OUT/public" --out "$OUT/public-notes-smollm2" --config "$OUT/notes.toml" \
  --epochs 3 --batch-size 16 --lr 2e-3 --seed 0
sha256sum "$OUT/public-notes-smollm2/adapter_model.safetensors"
"$PYTHON" - "$OUT/public-notes-smollm2" <<'PY'
import json
import sys
from pathlib import Path
from pprint import pformat

from fedgen.models.pretrained import RECORD_NAME, adapter_setup_of

made = json.loads((Path(sys.argv[1]) / RECORD_NAME).read_text(encoding="utf-8"))
record = {
    "weights_sha256": made["weights_sha256"],
    "text_config": {**adapter_setup_of(made["text_config"]), "base_model_sha256": made["text_config"]["base_model_sha256"]},
    "classes": made["classes"],
    "recipe": "bash scripts/pretrain-notes.sh",
}
print(f'SHIPPED["public-notes-smollm2"] = {pformat(record, sort_dicts=False)}')
PY
