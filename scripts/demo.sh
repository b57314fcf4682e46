#!/usr/bin/env bash
# Install fedgen and run the simulated consortium end to end: demo sites -> DP federated
# training (image + text, ε = 10 per site) -> synthetic data -> audit report -> release.
# The demo's images and notes share no patient, and its sites say so (different_people), so
# each model spends the ε = 10 on its own records instead of half of it.
# Everything lands in runs/$RUN_ID*. A run the release gate refuses is a finished demo (it says so
# and where to read why); any other failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
FEDGEN=.venv/bin/fedgen
RUN_ID=${RUN_ID:-demo-$(date +%Y%m%d-%H%M%S)}
RUN=runs/$RUN_ID
$FEDGEN demo-data "$RUN-sites" --sites 3 --seed 0 --different-people
$FEDGEN data check "$RUN-sites/site-1"
$FEDGEN simulate --sites-dir "$RUN-sites" --config scripts/demo.toml --modality both --epsilon 10 --run-id "$RUN_ID"
$FEDGEN generate "$RUN" --modality image --per-class 128
$FEDGEN generate "$RUN" --modality text --per-class 20
$FEDGEN audit "$RUN"
status=0
$FEDGEN release "$RUN" || status=$?
if [ "$status" -eq 3 ]; then  # fedgen release: the gate refused the run
  echo
  echo "DEMO NOT RELEASED: the release gate REFUSED the run (its failed checks are listed above)."
  echo "  why, figure by figure: $RUN/audit/report.html"
  exit 0
fi
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
echo
echo "Released: $RUN/release (every file listed with its SHA-256 in MANIFEST.sha256)"
echo "  synthetic fundus images, 8 per grade: $RUN/release/synthetic/contact-sheet.png"
echo "  synthetic notes:                      $RUN/release/synthetic/texts.jsonl, for instance:"
.venv/bin/python - "$RUN/release/synthetic/texts.jsonl" <<'PY'
import json
import sys

seen = {}
for line in open(sys.argv[1], encoding="utf-8"):
    note = json.loads(line)
    seen.setdefault(note["label"], note["text"])
for label, text in list(seen.items())[:3]:
    print(f"    [{label}] {' '.join(text.split())[:300]}")
PY
echo "  the audit and the gate's decision:    $RUN/release/audit/report.html"
