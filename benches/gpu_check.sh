#!/usr/bin/env bash
# One prepared GPU check, meant for a single call on a lent GPU machine (~8 minutes in all):
#
#   1. nvidia-smi, versions, and an import check of everything the steps need;
#   2. HIPT region features: benches/test_bench_hipt.py -k regions_gpu (4096 px regions of a
#      generated real-tissue slide: pathflow extract --model regions, bf16 + compile, against
#      the HIPT-style loop; target >= 60 regions/s);
#   3. ViT-4K pretraining steps: python -m pathflow.train.benchmark --method hipt4k --compare
#      (eager fp32 vs bf16 + compile; target >= 10,000 regions/s);
#   4. DINO ViT-S/16 training steps: python -m pathflow.train.benchmark --method dino --compare;
#   5. SimCLR ResNet-50 two-view training steps (benchmark --method simclr --arch resnet50
#      --compare; the steps include the embed_std/eff_rank collapse monitors);
#   6. the other GPU benches (pytest benches -k gpu, minus the ones above), in the time left.
#
# Each step runs under its own `timeout` (capped by what is left of GPU_CHECK_BUDGET seconds,
# default 470), so one hang does not eat the others; a failed step is reported and the next
# one runs. Everything is tee'd to $OUT/gpu_check.log (OUT defaults to ./gpu_check_out), with
# the JSON results beside it and all their figures gathered in $OUT/gpu_check.json. Exit
# status: 0 if every step that ran passed.
#
# Environment, nothing heavy is built or installed here:
#   * a .venv in the repo root with `pip install -e ".[train,eval,test]"` done (activated if
#     present), or python3 with torch, timm, pytest, pytest-benchmark, h5py, opencv, tifffile
#     (the lent H200 image has these) plus wheels in $WHEELS (default .whl/: the pathflow
#     wheel from `maturin build --release`, openslide-python, openslide-bin, imagecodecs),
#     installed with pip --no-index into /tmp/site;
#   * no network: the generated slides need the cmu-small sample; give a cache folder holding
#     samples/cmu_small_region.svs as $PATHFLOW_CACHE_DIR, or a .gpu_cache/ folder in the repo
#     root (cp ~/.cache/pathflow/samples/cmu_small_region.svs .gpu_cache/samples/).
#
# Run from anywhere: bash benches/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

BUDGET="${GPU_CHECK_BUDGET:-470}"
START=$SECONDS
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()
FAILED=0

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MAX_SECONDS COMMAND...: run under timeout min(MAX, time left); never exits.
step() {
    local name="$1" max="$2"
    shift 2
    local t rc=0 t0=$SECONDS
    t=$(left)
    ((t > max)) && t=$max
    if ((t < 20)); then
        echo "=== [$name] skipped: $(left) s of the budget left"
        SUMMARY+=("$name: skipped (no time left)")
        return 0
    fi
    echo
    echo "=== [$name] (timeout ${t} s, $(left) s of the budget left): $*"
    timeout --kill-after=15 "$t" "$@" || rc=$?
    local dt=$((SECONDS - t0))
    if ((rc == 0)); then
        SUMMARY+=("$name: ok (${dt} s)")
    else
        ((rc == 124 || rc == 137)) && SUMMARY+=("$name: TIMED OUT after ${dt} s") ||
            SUMMARY+=("$name: FAILED rc=$rc (${dt} s)")
        FAILED=1
    fi
    return 0
}

main() {
# ---------------------------------------------------------------- environment
if [[ -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
WHEELS="${WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing the wheels of $WHEELS into /tmp/site (no index)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -z "${PATHFLOW_CACHE_DIR:-}" && -d .gpu_cache ]]; then
    export PATHFLOW_CACHE_DIR="$PWD/.gpu_cache"
fi
PY="${PYTHON:-python3}"

echo "gpu_check $(date -u +%FT%TZ) in $PWD, OUT=$OUT, budget ${BUDGET} s"
echo "PATHFLOW_CACHE_DIR=${PATHFLOW_CACHE_DIR:-<unset>} PYTHONPATH=${PYTHONPATH:-<unset>}"
nvidia-smi || echo "nvidia-smi failed"
echo "CPU cores: $(nproc)"

step env 90 "$PY" - <<'EOF'
import importlib, os, sys
print("python", sys.version.split()[0], sys.executable)
missing = []
for name in ["torch", "timm", "pathflow", "pathflow._core", "openslide", "h5py", "cv2",
             "tifffile", "imagecodecs", "pytest", "pytest_benchmark", "tqdm", "yaml"]:
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        missing.append(name)
        print(f"  {name}: MISSING ({type(exc).__name__}: {exc})")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
cache = os.environ.get("PATHFLOW_CACHE_DIR") or os.path.expanduser("~/.cache/pathflow")
sample = os.path.join(cache, "samples", "cmu_small_region.svs")
print("cmu-small sample:", sample, "found" if os.path.isfile(sample) else "NOT FOUND (needs network)")
if missing or not torch.cuda.is_available():
    sys.exit(f"not ready: missing {missing}, cuda {torch.cuda.is_available()}")
EOF
if [[ "${SUMMARY[-1]}" != env:\ ok* ]]; then
    echo "environment not ready; stopping (see above)"
    printf '%s\n' "${SUMMARY[@]}"
    return 1
fi

# ---------------------------------------------------------------- the checks
step hipt-regions 300 "$PY" -m pytest benches/test_bench_hipt.py -k regions_gpu \
    --benchmark-only -p no:cacheprovider -s -q --benchmark-json "$OUT/bench_hipt_regions.json"

step train-hipt4k 130 "$PY" -m pathflow.train.benchmark --method hipt4k --batch-size 512 \
    --device cuda --steps 30 --warmup 5 --compare --json "$OUT/train_hipt4k.json"

step train-dino 150 "$PY" -m pathflow.train.benchmark --method dino \
    --arch vit_small_patch16_224 --batch-size 128 --device cuda --steps 20 --warmup 5 \
    --compare --json "$OUT/train_dino.json"

step train-simclr-r50 150 "$PY" -m pathflow.train.benchmark --method simclr --arch resnet50 \
    --batch-size 128 --device cuda --steps 20 --warmup 5 --compare \
    --json "$OUT/train_simclr_r50.json"

step other-gpu-benches 600 "$PY" -m pytest benches -k \
    "gpu and not regions_gpu and not pretrain_gpu and not train_step_gpu" \
    --benchmark-only -p no:cacheprovider -s -q --benchmark-json "$OUT/bench_other_gpu.json"

echo
echo "=== summary ($((SECONDS - START)) s of ${BUDGET} s)"
printf '  %s\n' "${SUMMARY[@]}"
printf '%s\n' "${SUMMARY[@]}" >"$OUT/steps.txt"
# every figure of the JSON files above in one file (a missing or broken one is noted)
timeout 30 "$PY" - "$OUT" <<'EOF' || echo "gpu_check.json: not written"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
figures = {"steps": (out / "steps.txt").read_text().splitlines()}
for f in sorted(out.glob("*.json")):
    if f.name == "gpu_check.json":
        continue
    try:
        data = json.loads(f.read_text())
    except ValueError as exc:
        figures[f.stem] = f"unreadable: {exc}"
        continue
    if "benchmarks" in data:  # pytest-benchmark: name -> mean seconds and extra figures
        data = {
            b["name"]: {"mean_s": b["stats"]["mean"], **b.get("extra_info", {})}
            for b in data["benchmarks"]
        }
    figures[f.stem] = data
(out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
print(f"figures of {len(figures) - 1} JSON file(s) in {out / 'gpu_check.json'}")
EOF
return "$FAILED"
}

rc=0
main 2>&1 | tee "$LOG" || rc=$?
keys=$(grep -hE "vs HIPT-style|target >=| img/s| regions/s \(|vs eager fp32" "$LOG" |
    sed 's/^/  /' || true)
printf '\nkey lines:\n%s\n' "$keys" | tee -a "$LOG"
exit "$rc"
