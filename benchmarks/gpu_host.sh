#!/usr/bin/env bash
# The GPU benchmarks on an offline GPU host whose Python already has JAX
# with CUDA, Flax, Optax, Orbax, chex and the scientific stack (numpy,
# scipy, matplotlib, scikit-image, ...), but not the rest of setup.cfg's
# dependencies, and no network (BUILD.md, "ACT and SACT over vanilla on a
# GPU"). Run from the project root:
#
#   bash benchmarks/gpu_host.sh wheels [PYTHON_VERSION]   # here, online
#   bash benchmarks/gpu_host.sh run [OUT_DIR] [PHASE] [FLAGS]  # there
#
# `wheels` puts into .whl/ the wheels of the rest (pinned, without their
# dependencies) for the host's Python (3.12 unless given); carry .whl/ to
# the host with the working tree. `run` installs them under /tmp/site and
# runs one phase of `benchmarks/gpu_overhead.py` under a time limit
# (GPU_HOST_LIMIT_S, 480 s), writing its JSON and log to OUT_DIR ($OUT,
# else /tmp/gpu_host): PHASE `train` (the default: the training steps of
# CIFAR ResNet-110 at batch 128 and ImageNet ResNet-101 at batch 64, the
# issue's table; about 80 s of compiling on an H100), `forward` (the
# dense forward at batch 1 and 32, scanned), `all` (both, and the unrolled
# forward); FLAGS go to gpu_overhead.py. The JSON is written after each
# phase, so a run cut off by the limit keeps what it finished.
#
# Before it makes or installs anything, `run` checks that the wheels suit
# the Python it runs (PYTHON, else python3) and that nvidia-smi lists a GPU
# (GPU_HOST_ALLOW_CPU=1 lets it time the CPU instead); bad input ends in
# one line and status 2. GPU_HOST_SITE (/tmp/site) is where it installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Binary wheels, built per Python version and platform. protobuf too,
# though the host has one: tensorflow-metadata's generated code needs a
# runtime at least as new as the protoc that made it (6.31).
BINARY=(grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10
        pycocotools==2.0.11 protobuf==7.36.2)
# Pure-Python ones (promise has only a source release: built here).
PURE=(ml-collections==1.1.0 tensorflow-datasets==4.9.10
      tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
      immutabledict==4.3.1 importlib-resources==7.1.0 portpicker==1.6.0
      promise==2.3 simple-parsing==0.1.9 docstring-parser==0.18.0
      tensorboardx==2.6.5 termcolor==3.3.0 toml==0.10.2 tzdata==2026.6)

wheels() {
  local version="${1:-3.12}"
  local python="${PYTHON:-python3}"
  rm -rf .whl && mkdir -p .whl
  "$python" -m pip download -q --no-deps --only-binary=:all: \
      --python-version "$version" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${BINARY[@]}"
  "$python" -m pip wheel -q --no-deps -w .whl "${PURE[@]}"
  local exclude
  exclude="$(git rev-parse --git-path info/exclude)"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null \
      || { mkdir -p "$(dirname "$exclude")" && echo '/.whl/' >> "$exclude"; }
  ls .whl | wc -l | xargs echo 'wheels in .whl/:'
  du -sh .whl
}

# Prints the first wheel of .whl/ that pip would refuse for the Python
# that runs it (with that Python's version), and fails; pip's own error came
# only after OUT was made.
WHEEL_CHECK='
import glob, sys
try:
  from packaging.tags import sys_tags
  from packaging.utils import parse_wheel_filename
except ImportError:
  from pip._vendor.packaging.tags import sys_tags
  from pip._vendor.packaging.utils import parse_wheel_filename
supported = set(sys_tags())
version = "%d.%d" % sys.version_info[:2]
for path in sorted(glob.glob(".whl/*.whl")):
  if not supported & set(parse_wheel_filename(path[5:])[3]):
    print(path[5:], version)
    sys.exit(1)
'

run() {
  local out="${1:-${OUT:-/tmp/gpu_host}}" phase="${2:-train}"
  shift $(($# < 2 ? $# : 2))
  local limit="${GPU_HOST_LIMIT_S:-480}" args=()
  local python="${PYTHON:-python3}" site="${GPU_HOST_SITE:-/tmp/site}"
  case "$phase" in
    train) args=(--forward_batches= --train_variants=scan) ;;
    forward) args=(--train_batches= --forward_variants=scan) ;;
    all) args=() ;;
    *) echo "error: PHASE must be train, forward or all, got $phase" >&2
       return 2 ;;
  esac
  if ! compgen -G '.whl/*.whl' > /dev/null; then
    echo 'error: no wheels in .whl/: run `bash benchmarks/gpu_host.sh' \
         'wheels` first, and carry .whl' >&2
    return 2
  fi
  if ! command -v "$python" > /dev/null; then
    echo "error: no $python here (set PYTHON to the host's Python)" >&2
    return 2
  fi
  local refused
  if ! refused="$("$python" -c "$WHEEL_CHECK" 2> /dev/null)"; then
    if [[ -z "$refused" ]]; then
      echo "error: $python could not check the wheels (no pip?)" >&2
    else
      echo "error: .whl/${refused% *} does not suit $python" \
           "(Python ${refused##* }): run \`bash benchmarks/gpu_host.sh" \
           "wheels ${refused##* }\` where there is a network" >&2
    fi
    return 2
  fi
  # nvidia-smi, not JAX: JAX comes with the wheels, installed below.
  if [[ "${GPU_HOST_ALLOW_CPU:-0}" != 1 ]] \
      && ! nvidia-smi -L 2> /dev/null | grep -q '^GPU '; then
    echo 'error: no GPU here (nvidia-smi -L lists none);' \
         'GPU_HOST_ALLOW_CPU=1 times the CPU instead' >&2
    return 2
  fi
  mkdir -p "$out"
  "$python" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
  nvidia-smi -L || true
  "$python" -c 'import jax, flax; print("jax", jax.__version__, "flax",
flax.__version__, jax.devices())'
  timeout "$limit" "$python" -m benchmarks.gpu_overhead "${args[@]}" "$@" \
      --out="$out/gpu_overhead_$phase.json" 2>&1 | tee "$out/$phase.log"
}

USAGE='usage: bash benchmarks/gpu_host.sh wheels [PYTHON_VERSION]'
USAGE+=' | run [OUT_DIR] [train|forward|all] [FLAGS]'

case "${1:-}" in
  wheels) shift; wheels "$@" ;;
  run) shift; run "$@" ;;
  -h|--help|help) echo "$USAGE" ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
