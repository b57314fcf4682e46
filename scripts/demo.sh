#!/usr/bin/env bash
# Install fedgen and run the simulated consortium end to end: demo sites -> DP federated
# training (image + text) -> synthetic data -> audit report. Everything lands in runs/demo-*.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
FEDGEN=.venv/bin/fedgen
RUN_ID=${RUN_ID:-demo-$(date +%Y%m%d-%H%M%S)}
$FEDGEN demo-data "runs/$RUN_ID-sites" --sites 3 --seed 0
$FEDGEN data check "runs/$RUN_ID-sites/site-1"
$FEDGEN simulate --sites-dir "runs/$RUN_ID-sites" --modality both --run-id "$RUN_ID"
$FEDGEN generate "runs/$RUN_ID" --modality image --per-class 20
$FEDGEN generate "runs/$RUN_ID" --modality text --per-class 20
$FEDGEN audit "runs/$RUN_ID"
echo "audit report: runs/$RUN_ID/audit/report.html  (release with: $FEDGEN release runs/$RUN_ID)"
