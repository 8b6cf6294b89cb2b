#!/usr/bin/env bash
# The test suite, on the CPU, under the newest transformers and under 4.44.2 (the JetPack 6.0-era version, whose
# tokenisation and pipeline text differ from 5.x). Each gets its own virtual environment beside the repo.
# TORCH_SPEC picks the torch to install (default: the CPU build 2.13.0; a bare "torch" pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
for tf in "transformers>=4.40" "transformers==4.44.2"; do
  venv=".venv-tests-$(echo "$tf" | tr -c 'a-z0-9.\n' '_')"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC"
  "$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt "$tf" pytest
  echo "== tests with $("$venv/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
  "$venv/bin/python" -m pytest -q tests
done
