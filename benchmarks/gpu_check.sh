#!/usr/bin/env bash
# The prepared GPU check: one run on a lent GPU machine, every part capped so that the whole stays under
# 7 minutes (410 s of caps; usually 4 to 5 minutes) on one GPU. No internet needed there.
#
#   bash benchmarks/gpu_check.sh prepare   # here, once, with pip's index: .gpu_check/ (git-ignored) holds
#                                          # open_clip's wheels and a 2000 / 500-image Fashion-MNIST subset
#   bash benchmarks/gpu_check.sh           # there: the device tool with carry [".gpu_check"]
#
# Parts, in order (seconds cap):
#   env         nvidia-smi; python, torch, CUDA and NVIDIA driver versions                   (20)
#   pytest      pytest -m cuda on the test files with CUDA variants (tests/test_devices.py): (150)
#               no host syncs in a train step, fp32 targets under amp, CRD, DKD, resident
#               batches, resume; the Ray tests skip where Ray is not installed
#   throughput  run.py --quick --only throughput --device cuda: one trial alone               (90)
#   pack        gpu_pack.py --ks 1,4: 1 and 4 trials packed on the GPU, memory-capped          (100)
#   agreement   gpu_pack.py: CPU-vs-GPU loss terms (TF32 on / off, bf16 autocast)             (50)
# Results go to $OUT if set (the device tool collects it), else benchmarks/gpu_check/: gpu_check.json is
# rewritten after every part (each part's status, seconds and files, so a timeout keeps what was measured),
# next to gpu_check.log, pytest_cuda.xml, gpu_results.json, pack.json and agreement.json (each written as its
# part goes); one summary is printed at the end.
# GPU_CHECK_DEVICE=cpu runs the parts that need no GPU here, with tiny settings (a smoke test of this script).
# GPU_CHECK_PYTHON names the Python (default: the first of .venv/bin/python, python3, python that has torch).
set -u
cd "$(dirname "$0")/.."
for PY in "${GPU_CHECK_PYTHON:-}" .venv/bin/python python3 python; do    # the first Python with torch
  [ -n "$PY" ] && "$PY" -c "import torch" 2>/dev/null && break
done
export RAY_AUTH_MODE=disabled MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
FMNIST=/usr/share/datasets/fashion-mnist    # richkd.data.sources.DEBIAN_FASHION_MNIST_DIR, the tests' source

if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu_check/whl .gpu_check/fashion-mnist
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu_check/whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 || exit 1
  $PY - "$FMNIST" <<'EOF' || exit 1
import sys
from pathlib import Path

from richkd.data import read_idx
from tests.data_fixtures import write_idx

src, dest = Path(sys.argv[1]), Path(".gpu_check/fashion-mnist")
for prefix, n in (("train", 2000), ("t10k", 500)):
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        write_idx(dest / name, read_idx(src / name)[:n])
EOF
  du -sh .gpu_check
  echo 'now: the device tool, command "bash benchmarks/gpu_check.sh", carry [".gpu_check"], timeout_s 480'
  exit 0
fi

DEST="${OUT:-benchmarks/gpu_check}"
mkdir -p "$DEST"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
LOG="$DEST/gpu_check.log"
JSON="$DEST/gpu_check.json"
: > "$LOG"
rm -f "$JSON"
say() { echo "$@" | tee -a "$LOG"; }

# record PART RC SECONDS [FILE...]: add one part's outcome to gpu_check.json (rewritten atomically)
record() {
  $PY - "$JSON" "$DEVICE" "$@" <<'EOF'
import json, os, sys, time
path, device, part, rc, seconds, *files = sys.argv[1:]
data = json.load(open(path)) if os.path.exists(path) else {"device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": {}}
rc = int(rc)
data["parts"][part] = {"rc": rc, "seconds": round(float(seconds), 1), "timed_out": rc in (124, 137),
                       "files": [os.path.basename(f) for f in files if os.path.exists(f)]}
tmp = path + ".tmp"
with open(tmp, "w") as fh:
    json.dump(data, fh, indent=1)
os.replace(tmp, path)
EOF
}

# part NAME CAP FILE -- COMMAND...: run COMMAND under `timeout CAP`, log it, record it
part() {
  local name=$1 cap=$2 file=$3
  shift 4
  say "== $name (at most ${cap}s): $*"
  local t0=$SECONDS
  timeout "$cap" "$@" >> "$LOG" 2>&1
  local rc=$?
  say "   $name: exit $rc after $((SECONDS - t0))s"
  record "$name" "$rc" "$((SECONDS - t0))" "$file"
}

if ! $PY -c "import open_clip" 2>/dev/null && ls .gpu_check/whl/*.whl >/dev/null 2>&1; then
  say "installing the carried wheels from .gpu_check/whl into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_check/whl/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -e .gpu_check/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  say "installing the carried Fashion-MNIST subset into $FMNIST"
  mkdir -p "$FMNIST" && cp .gpu_check/fashion-mnist/*.gz "$FMNIST"/
fi

env_info() {
  nvidia-smi || echo "nvidia-smi: not available"
  $PY -c "import sys, torch; from richkd.device import nvidia_driver_version as driver
print('python', sys.version.split()[0], 'torch', torch.__version__, 'built for CUDA', torch.version.cuda,
      'NVIDIA driver', driver(), 'CUDA available', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  $PY -c "import open_clip; print('open_clip', open_clip.__version__)" 2>&1 | tail -1
}
export -f env_info
export PY
part env 20 "$LOG" -- bash -c env_info
grep -E "^(python|open_clip) " "$LOG"

if [ "$DEVICE" = cpu ]; then
  PYTEST_TESTS=(tests/test_devices.py -k "cpu and (dkd or crd)")
  RUN_ARGS=(--quick --only throughput)
  PACK_ARGS=(--ks 1,2 --specs L/cached/tiny --seconds 3 --warmup 1)
  AGREE_ARGS=(--agree-steps 2)
else
  mapfile -t CUDA_FILES < <(grep -rl "pytest.mark.cuda" tests --include='test_*.py' | sort)
  PYTEST_TESTS=(-m cuda "${CUDA_FILES[@]}")
  RUN_ARGS=(--quick --only throughput)
  PACK_ARGS=(--ks 1,4 --specs LF/cached/tiny --seconds 10 --warmup 10)
  AGREE_ARGS=(--agree-steps 3)
fi

part pytest 150 "$DEST/pytest_cuda.xml" -- $PY -m pytest -q -p no:cacheprovider -o addopts="" -rfEs \
  --junitxml="$DEST/pytest_cuda.xml" "${PYTEST_TESTS[@]}"
part throughput 90 "$DEST/gpu_results.json" -- $PY benchmarks/run.py "${RUN_ARGS[@]}" --device "$DEVICE" \
  --out "$DEST/gpu_results.json"
part pack 100 "$DEST/pack.json" -- $PY benchmarks/gpu_pack.py "${PACK_ARGS[@]}" --skip agreement --device "$DEVICE" \
  --out "$DEST/pack.json"
part agreement 50 "$DEST/agreement.json" -- $PY benchmarks/gpu_pack.py "${AGREE_ARGS[@]}" --skip pack \
  --device "$DEVICE" --out "$DEST/agreement.json"

$PY - "$DEST" <<'EOF' | tee -a "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET

dest = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(dest, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


check = load("gpu_check.json") or {"parts": {}}
print(f"== GPU check summary ({check.get('device')}; files in {dest})")
for name, p in check["parts"].items():
    state = "TIMED OUT" if p["timed_out"] else "ok" if p["rc"] == 0 else f"FAILED (exit {p['rc']})"
    print(f"  {name:<11} {state:<16} {p['seconds']:>6.0f}s")
try:
    suite = ET.parse(os.path.join(dest, "pytest_cuda.xml")).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    print(f"  pytest: {suite.get('tests')} tests, {suite.get('failures')} failed, {suite.get('errors')} errors, "
          f"{suite.get('skipped')} skipped" + "".join(f"\n    FAILED {f}" for f in failed))
except (OSError, ET.ParseError, AttributeError):
    print("  pytest: no report")
throughput = (load("gpu_results.json") or {}).get("throughput", {})
for row in throughput.get("rows", []):
    print(f"  throughput {row['config']:<26} {row['images_per_s']:>9} images/s")
for key, value in throughput.get("ratios", {}).items():
    print(f"  ratio {key}: {value}")
for row in (load("pack.json") or {}).get("pack", {}).get("rows", []):
    print(f"  pack {row['spec']} k={row['k']}: {row['total_images_per_s']} images/s in all, {row.get('ratio_vs_1')}x "
          f"one trial alone, peak MB per trial {row.get('cuda_peak_mb_per_trial')}")
for row in (load("agreement.json") or {}).get("agreement", {}).get("rows", []):
    print(f"  agreement {row['setting']}: step 1 max |diff| {row['step1_max_abs_diff']}, all steps "
          f"{row['all_steps_max_abs_diff']}")
for goal in [g for k in ("pack.json", "agreement.json") for g in (load(k) or {}).get("goals", [])]:
    print(f"  goal {'MET' if goal['met'] else 'NOT MET'}: {goal['goal']} ({goal['value']})")
EOF
failed=$($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sum(p['rc'] != 0 for p in d['parts'].values()))" "$JSON")
exit $(( failed > 0 ))
