#!/usr/bin/env bash
# Prepared GPU check (about 6 minutes on one H200; no internet needed). Run from anywhere:
#   bash benchmarks/gpu_check.sh            # results in $OUT if set (the device tool collects it), else benchmarks/
# Steps: nvidia-smi; run.py throughput + clip_forward on cuda (one trial alone, fp32 and bf16+channels_last);
# gpu_pack.py: 1, 2 and 4 packed trials (memory fraction 1/k - 0.01 each) and CPU-vs-GPU loss agreement.
# open_clip is only needed for the online modes and clip_forward: if it is missing and wheels were carried in
# .whl/ (see benchmarks/README.md), they are installed into /tmp/site first; otherwise those parts are skipped.
# GPU_CHECK_DEVICE=cpu runs the same flow on the CPU with tiny settings (a smoke test of this script).
set -u
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; elif command -v python >/dev/null 2>&1; then PY=python; fi
DEST="${OUT:-benchmarks}"
mkdir -p "$DEST"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$DEST/gpu_check.log"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }

if ! $PY -c "import open_clip" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels from .whl/ into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

say "== nvidia-smi"
(nvidia-smi 2>&1 || echo "nvidia-smi not available") | tee -a "$LOG"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"
$PY -c "import open_clip; print('open_clip', open_clip.__version__)" 2>&1 | tail -1 | tee -a "$LOG"

status=0
if [ "$DEVICE" = "cpu" ]; then
  RUN_ARGS=(--quick --only throughput); PACK_ARGS=(--ks 1,2 --specs L/cached/tiny --seconds 3 --warmup 1 --agree-steps 2)
else
  RUN_ARGS=(--only throughput,clip_forward); PACK_ARGS=(--ks 1,2,4 --specs L/cached/tiny,LF/cached/tiny --seconds 12 --warmup 10 --agree-steps 3)
fi

say "== run.py ${RUN_ARGS[*]} --device $DEVICE (one trial alone)"
timeout 200 $PY benchmarks/run.py "${RUN_ARGS[@]}" --device "$DEVICE" --out "$DEST/gpu_results.json" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; say "run.py failed or timed out"; }

say "== gpu_pack.py ${PACK_ARGS[*]} --device $DEVICE"
timeout 270 $PY benchmarks/gpu_pack.py "${PACK_ARGS[@]}" --device "$DEVICE" --out "$DEST" 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; say "gpu_pack.py failed or timed out"; }

say "== done (status $status); results: $DEST/gpu_results.json $DEST/gpu_pack.json $LOG"
exit $status
