#!/usr/bin/env bash
# The recipe of the image checkpoint fedgen ships as fedgen:fundus-phantoms-32: 8,000 labelled
# public fundus phantoms (seed 1000: another population and other cameras than any demo site),
# then `fedgen pretrain` on the default image architecture with its defaults written out
# (30 epochs of batch 32 = 7,500 steps, Adam 2e-3, EMA 0.999, seed 0), on one thread so that the
# bytes do not depend on the machine's core count. About an hour on an idle machine.
# Prints the SHA-256 that fedgen/models/pretrained.py records for the weights.
#   bash scripts/pretrain-phantoms.sh [OUT]      (default OUT: runs/pretrain-phantoms)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/pretrain-phantoms}
FEDGEN=${FEDGEN:-.venv/bin/fedgen}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
cat > "$OUT/grades.toml" <<'TOML'
[data]  # the class embeddings in grade order
image_classes = ["No_DR", "Mild", "Moderate", "Severe", "Proliferate_DR"]
TOML
$FEDGEN demo-public "$OUT/public" --images 8000 --labelled --seed 1000
$FEDGEN pretrain --public "$OUT/public" --out "$OUT/fundus-phantoms-32" --config "$OUT/grades.toml" \
  --epochs 30 --batch-size 32 --lr 2e-3 --ema-decay 0.999 --seed 0
sha256sum "$OUT/fundus-phantoms-32/diffusion_pytorch_model.safetensors"
