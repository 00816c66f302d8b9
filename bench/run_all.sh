#!/usr/bin/env bash
# The benchmark set in one go: train step and decode against transformers, compiled memory (default
# subset), checkpoint load. JSON lines go to stdout and, with an argument, are appended to that file too.
#   bash bench/run_all.sh [results.jsonl]
# About 5 minutes on 2 idle CPU cores, 8 on one GPU (which also times the full-size 3B step, with and without
# remat where it fits, and decode).
# LOAD_ARGS overrides load.py's arguments (e.g. LOAD_ARGS="--scale 0.25" where disk is short).
set -uo pipefail  # no -e: one failing benchmark does not stop the others; the exit status says it failed
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # pgjax from this checkout, installed or not
PY=${PYTHON:-python3}
OUT_FILE=${1:-/dev/null}
failed=()
run() { echo "+ $*" >&2; "$PY" "$@" | tee -a "$OUT_FILE" || failed+=("$*"); }

platform=$("$PY" -c "import jax; print(jax.devices()[0].platform)") || { echo "jax does not import with $PY" >&2; exit 1; }
VS=(--vs hf)
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  VS=(); echo "note: torch/transformers not importable: no comparison with transformers" >&2
elif [ "$platform" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  VS=(); echo "note: JAX runs on $platform but torch has no CUDA: no comparison with transformers" >&2
fi

run bench/train_step.py "${VS[@]}" --breakdown
run bench/decode.py "${VS[@]}"
run bench/memory.py
if [ "$platform" = gpu ]; then
  # On a GPU the full-size recipe itself is cheap enough to time: 3B-224, float16 frozen, batch 8, text 128.
  run bench/train_step.py --config paligemma-3b-224 --frozen-dtype float16 --batch 8 --text-len 128 \
    --prefix-len 32 --remat full
  # The same step without remat (no recomputed forward: the MFU a large GPU gets), where its ~40 GiB of
  # compiled memory fit (bench/memory.py: 40.0 GiB on an H100).
  if "$PY" -c "import jax, sys; s = jax.devices()[0].memory_stats() or {}; sys.exit(s.get('bytes_limit', 0) < 50 * 2**30)"; then
    run bench/train_step.py --config paligemma-3b-224 --frozen-dtype float16 --batch 8 --text-len 128 \
      --prefix-len 32 --remat none
  else
    echo "note: under 50 GiB on the device: the 3B step without remat is not timed" >&2
  fi
  run bench/decode.py --config paligemma-3b-224
fi
# shellcheck disable=SC2086
run bench/load.py ${LOAD_ARGS:-}
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
