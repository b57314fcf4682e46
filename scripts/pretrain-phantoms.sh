#!/usr/bin/env bash
# The recipe of the image checkpoint fedgen ships as fedgen:fundus-phantoms-32: 8,000 labelled
# public fundus phantoms (seed 1000: another population and other cameras than any demo site),
# then `fedgen pretrain` on the default image architecture: 15 epochs of batch 32 = 3,750 steps
# (half of `fedgen pretrain`'s default 30, so that the recipe can be re-run in an hour), Adam 2e-3,
# EMA 0.999, seed 0, on one thread so that the bytes do not depend on the machine's core count.
# About half an hour on one thread of an idle machine; two to three hours on a loaded one.
# Prints the weights' SHA-256 and the record fedgen/models/pretrained.py keeps in SHIPPED; to
# ship, copy OUT/fundus-phantoms-32 to fedgen/checkpoints/ (4.5 MB of float32 weights).
#   bash scripts/pretrain-phantoms.sh [OUT]      (default OUT: runs/pretrain-phantoms)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pretrain-phantoms}
FEDGEN=${FEDGEN:-.venv/bin/fedgen}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
cat > "$OUT/grades.toml" <<'TOML'
[data]  # the class embeddings in grade order
image_classes = ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]
TOML
$FEDGEN demo-public "$OUT/public" --images 8000 --labelled --seed 1000
$FEDGEN pretrain --public "$OUT/public" --out "$OUT/fundus-phantoms-32" --config "$OUT/grades.toml" \
  --epochs 15 --batch-size 32 --lr 2e-3 --ema-decay 0.999 --seed 0
sha256sum "$OUT/fundus-phantoms-32/diffusion_pytorch_model.safetensors"
"$PYTHON" - "$OUT/fundus-phantoms-32" <<'PY'
import json
import sys
from pathlib import Path
from pprint import pformat

from fedgen.models.pretrained import RECORD_NAME, architecture_of

made = json.loads((Path(sys.argv[1]) / RECORD_NAME).read_text(encoding="utf-8"))
record = {
    "weights_sha256": made["weights_sha256"],
    "image_config": architecture_of(made["image_config"]),
    "classes": made["classes"],
    "labelled": made["labelled"],
    "recipe": "bash scripts/pretrain-phantoms.sh",
}
print(f'SHIPPED["fundus-phantoms-32"] = {pformat(record, sort_dicts=False)}')
PY
