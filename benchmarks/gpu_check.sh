#!/usr/bin/env bash
# One-shot GPU check for an offline GPU machine (H100/H200) that has torch and triton:
#   env            nvidia-smi, python/torch/triton/... versions, date, git commit
#   install        from the wheels directory only (--no-index), no build isolation, torch and
#                  triton pinned as installed: torchtitan 0.3.0 + what it needs, fla-core 0.6.0,
#                  einops, transformers (bench pin, if its wheel is there), mamba-ssm 2.3.2.post1
#                  (--no-deps, Triton only), causal-conv1d (--no-deps) if its wheel is there
#   tests          pytest tests/kernels, the CUDA file first (real kernels vs the torch path,
#                  fp32/bf16, packed)
#   bench          benchmarks/bench.py, debug + Nano-proxy, every layer type, model and mixer:
#                  ours vs transformers vs mamba-ssm's Mamba2, eager
#   train          NGPU=1 ./run_train.sh --training.steps 20 --compile.enable -> tokens/s, MFU
#   lowp-gemms     benchmarks/low_precision.py gemms: Nano's GEMM shapes, BF16 vs FP8 rowwise
#                  (SM89+) vs MXFP8 (SM100), fwd+bwd (needs torchao 0.18.0 in the wheels)
#   bench-compile  the benchmark with --compile (last: it gets what is left of the budget)
#   qlora-24gb     Nano QLoRA 3 steps, seq 4096, memory capped at 24 GiB (a 24 GB card
#                  emulated: benchmarks/memory_capped.py); needs torchao and the Nano
#                  weights in assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 (else skipped)
# Everything goes to ONE markdown file, benchmarks/results/<date>-<gpu>.md: environment, a
# result/time table, each step's command and output. A failed or timed-out step is recorded
# and the next one runs; each step's timeout is min(its cap, budget left), so the whole check
# ends within GPU_CHECK_BUDGET_S (+10 s). Exit status 1 if any step failed or was cut.
#
#   benchmarks/gpu_check.sh                         # on the GPU machine, from anywhere
#   benchmarks/gpu_check.sh --prepare-wheels DIR    # on a machine with internet: fill DIR
#   GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh     # print the commands instead of running them
# Environment:
#   GPU_CHECK_WHEELS    wheels + sdists      default: the first of <repo>/wheels, <repo>/.whl, <repo>/../wheels
#   GPU_CHECK_OUT       results file or dir  default: benchmarks/results/ (dry run: /tmp)
#   GPU_CHECK_BUDGET_S  whole check, s       default 560
#   GPU_CHECK_SKIP      steps to skip, comma list, e.g. install,bench-compile
#   GPU_CHECK_COMMIT    commit to record where the copy has no .git
#   PYTHON              interpreter          default python
# --prepare-wheels DIR: pip resolves torchtitan==0.3.0, fla-core==0.6.0, einops, transformers
# (bench pin), setuptools, wheel and packaging for cp312 manylinux x86_64 around BOX_HAS, what
# the GPU machine has: NAME==VERSION entries (default "torch==2.11.0 triton==3.6.0") stand in,
# without dependencies; bare NAMEs are resolved but not downloaded (pass its package list to
# fit a 64 MiB transfer: 2026-12, ~28 MiB against the H200 image's list, ~160 MiB without).
# It downloads that closure less BOX_HAS and nvidia-*/cuda-*, the mamba-ssm sdist, and builds
# a py3-none-any wheel from it (needs torch here; else the GPU machine builds the sdist).
# causal-conv1d needs nvcc: build its sm_90 wheel as in README "GPU extras", put it in DIR.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
export PY=${PYTHON:-python} DRY=${GPU_CHECK_DRY_RUN:-0} PYTHONUNBUFFERED=1  # a timed-out step keeps its output
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"                          # this checkout, installed or not
REQS=(torchtitan==0.3.0 fla-core==0.6.0 einops torchao==0.18.0)
HF_REQ='transformers>=5.23,<5.25'                 # pyproject's bench/test pin
MAMBA=(env MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE)  # Triton only: no nvcc, no GitHub wheel
# shellcheck disable=SC2054  # the commas belong to --only
BENCH=(benchmarks/bench.py --device cuda --configs debug,nano --only 'M,*,-,E,model,mixer')

x() { printf '+'; printf ' %q' "$@"; echo; [[ $DRY == 1 ]] || "$@"; }   # every command that changes or measures anything

prepare_wheels() {  # DIR
    local dir tmp pkgs n tags=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312)
    for n in 2014 _2_17 _2_24 _2_27 _2_28 _2_31 _2_34 _2_35; do tags+=(--platform "manylinux${n}_x86_64"); done
    mkdir -p "$1" && dir=$(cd "$1" && pwd) && tmp=$(mktemp -d) || return 1
    # what the GPU machine has: NAME==VERSION becomes a dependency-free stand-in that pip
    # resolves around (torch, triton: no CUDA libraries); a bare NAME is just not downloaded
    local has hf=("$HF_REQ"); read -ra has <<<"$(tr '\n' ' ' <<<"${BOX_HAS:-torch==2.11.0 triton==3.6.0}")"
    [[ " ${has[*]}" == *" transformers=="* ]] && hf=()
    "$PY" -c 'import sys, zipfile
for name, _, version in (r.partition("==") for r in sys.argv[2:] if "==" in r):
    version = version.split("+")[0]
    dist = f"{name}-{version}+stub"
    with zipfile.ZipFile(f"{sys.argv[1]}/{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}+stub\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    print(f"{name}=={version}+stub")' "$tmp" "${has[@]}" >"$tmp/pins.txt" || return 1
    x "$PY" -m pip install --dry-run --ignore-installed --target "$tmp/t" --quiet --report "$tmp/report.json" \
        "${tags[@]}" --find-links "$tmp" -c "$tmp/pins.txt" "${REQS[@]}" "${hf[@]}" setuptools wheel packaging || return 1
    if [[ $DRY == 1 ]]; then pkgs=("<the resolved closure minus BOX_HAS and nvidia-*/cuda-*>")
    else mapfile -t pkgs < <("$PY" -c 'import json, re, sys
for i in json.load(open(sys.argv[1]))["install"]:
    m = i["metadata"]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    if not (m["version"].endswith("+stub") or re.fullmatch(r"(nvidia|cuda)-.*", norm(m["name"]))
            or norm(m["name"]) in map(norm, sys.argv[2:])):
        print(m["name"] + "==" + m["version"])' "$tmp/report.json" "${has[@]}") || return 1; fi
    x "$PY" -m pip download --no-deps "${tags[@]}" -d "$dir" "${pkgs[@]}" || return 1
    x "${MAMBA[@]}" "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation \
        -d "$dir" mamba-ssm==2.3.2.post1 || return 1
    x "${MAMBA[@]}" "$PY" -m pip wheel --no-deps --no-build-isolation -w "$dir" \
        "$dir/mamba_ssm-2.3.2.post1.tar.gz" || echo "no mamba-ssm wheel here: the GPU machine builds the sdist"
    rm -r "$tmp"; x du -sh "$dir"
}

if [[ ${1:-} == --prepare-wheels ]]; then
    [[ $# == 2 ]] || { echo "usage: $0 --prepare-wheels DIR" >&2; exit 2; }
    prepare_wheels "$2"; exit
elif [[ $# -gt 0 ]]; then
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; [[ $1 == -h || $1 == --help ]]; exit $((2 * $?))
fi

for WHEELS in "${GPU_CHECK_WHEELS:-}" "$ROOT/wheels" "$ROOT/.whl" "${ROOT%/*}/wheels"; do [[ -d $WHEELS ]] && break; done
if COMMIT=$(git -C "$ROOT" log -1 --format='%H %<(60,trunc)%s' 2>/dev/null); then
    COMMIT="$COMMIT (+$(git -C "$ROOT" status --porcelain | wc -l) changed files)"
else COMMIT=${GPU_CHECK_COMMIT:-"unknown (no .git: set GPU_CHECK_COMMIT)"}; fi
TMP=$(mktemp -d) || exit 2
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SLUG=$(printf '%s' "${GPU:-no-gpu}" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/-$//')
if [[ -d ${GPU_CHECK_OUT:-} ]]; then BASE=$GPU_CHECK_OUT/; elif [[ $DRY == 1 ]]; then BASE=${TMPDIR:-/tmp}/gpu_check-dryrun-
else BASE=$ROOT/benchmarks/results/; fi
BASE=$BASE$(date +%F)-$SLUG OUT=$BASE.md n=1
while [[ -e $OUT ]]; do n=$((n + 1)); OUT=$BASE-$n.md; done
[[ -z ${GPU_CHECK_OUT:-} || -d $GPU_CHECK_OUT ]] || OUT=$GPU_CHECK_OUT
mkdir -p "$(dirname "$OUT")" || exit 2
BUDGET=${GPU_CHECK_BUDGET_S:-560} START_DATE=$(date -u '+%Y-%m-%d %H:%M:%S UTC') ROWS=() FAILED=0 TPID=

# shellcheck disable=SC2317  # environment and install_extras run inside a step's bash -c
environment() {  # read-only: runs in a dry run too
    date -u; uname -srm; echo "host $(hostname), $(nproc) CPUs"
    echo "commit: $COMMIT"; echo "wheels: $WHEELS"; ls "$WHEELS" 2>&1
    timeout 30 nvidia-smi || echo "nvidia-smi: not available"
    "$PY" -c 'import importlib.metadata as md, platform, torch
print("python", platform.python_version())
for d in ("torch", "triton", "transformers", "torchtitan", "fla-core", "einops", "mamba-ssm", "causal-conv1d"):
    try: print(d, md.version(d))
    except md.PackageNotFoundError: print(d, "-")
print("torch cuda", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")'
}

# shellcheck disable=SC2317
install_extras() {  # offline: only $WHEELS; torch and triton stay as they are
    local rc=0 pins=$TMP/pins.txt pip
    "$PY" -c 'import torch, triton; print(f"torch=={torch.__version__}\ntriton=={triton.__version__}")' >"$pins" || return 1
    [[ -d $WHEELS ]] || echo "no wheels directory $WHEELS: only what is installed already"
    pip=("$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -c "$pins")
    x "${pip[@]}" setuptools wheel packaging || true        # build tools for the mamba-ssm sdist
    x "${pip[@]}" "${REQS[@]}" || {  # resolver failed: add every wheel of a project not installed, as it is
        echo "falling back to --no-deps for the wheels of projects not installed yet"; local new
        mapfile -t new < <("$PY" -c 'import importlib.metadata as md, pathlib, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions()}
print(*(w for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")) if norm(w.name.split("-")[0]) not in have), sep="\n")' "$WHEELS")
        ((${#new[@]})) && x "${pip[@]}" --no-deps "${new[@]}"; } || rc=1
    x "${pip[@]}" "$HF_REQ" || echo "transformers kept as installed (the bench compares against it)"
    x "${MAMBA[@]}" "${pip[@]}" --no-deps mamba-ssm==2.3.2.post1 || rc=1
    if compgen -G "$WHEELS/causal_conv1d-*.whl" >/dev/null; then x "${pip[@]}" --no-deps causal-conv1d || rc=1
    else echo "no causal-conv1d wheel: the conv runs on fla-core's Triton kernel (or torch)"; fi
    x "$PY" -m pip check || true
    [[ $DRY == 1 ]] || "$PY" -c 'import torch, triton; print(f"torch=={torch.__version__}\ntriton=={triton.__version__}")' \
        | diff "$pins" - || { echo "torch/triton CHANGED"; rc=1; }
    x "$PY" -c 'import torchtitan.trainer, fla, einops
from torchtitan_nemotron3.ops import auto_plan; print("auto:", auto_plan("cuda"))' || rc=1
    return "$rc"
}
# what a step's `bash -c` needs (arrays cannot be exported)
DEFS=$(declare -p PY DRY WHEELS TMP COMMIT REQS HF_REQ MAMBA; declare -f x environment install_extras)

clip() {  # a log as text: no colour codes or \r progress, at most 600 lines
    sed -E 's/\x1b\[[0-9;]*[A-Za-z]//g; s/.*\r//' "$1" | awk -v n="$(wc -l <"$1")" \
        'NR <= 100 || NR > n - 500 { print; next } NR == 101 { print "[... " n - 600 " lines cut ...]" }'
}
note() {  # NAME LOG: one line for the table
    case $1 in
        tests) grep -E ' (passed|failed|error|errors|skipped|no tests ran)' "$2" | tail -1 | tr -d '=' ;;
        train) clip "$2" | awk '{ for (i = 1; i < NF; i++) { if ($i == "step:") s = $(i + 1); if ($i == "loss:") l = $(i + 1)
                   if ($i == "tps:") { t = $(i + 1); gsub(",", "", t) } if ($i == "mfu:") m = $(i + 1) } }
               / tps: / { n++; if (n == 1) l0 = l; last = l; if (s + 0 > 5) { k++; ts += t; ms += m } }
               END { if (k) printf "loss %s -> %s; steps 6-%d: %.0f tokens/s, MFU %.2f%% (debug model)", l0, last, s, ts / k, ms / k }' ;;
        *) clip "$2" | grep -v '^\s*$' | tail -1 ;;
    esac | sed 's/|/\\|/g' | cut -c1-200
}
write_results() {
    { echo "# GPU check: ${GPU:-no GPU}, $START_DATE"; echo
      echo "- commit: $COMMIT"
      echo "- total $((SECONDS)) s of a $BUDGET s budget; wheels: \`$WHEELS\`$([[ $DRY == 1 ]] && echo '; DRY RUN')"
      echo; echo "| step | result | seconds | timeout | note |"; echo "|---|---|---|---|---|"
      printf '%s\n' "${ROWS[@]}"; cat "$TMP/body.md" 2>/dev/null; } >"$OUT"
}
record() {  # RESULT: one table row and one output section for the current step
    [[ $1 == pass || $1 == "dry run" ]] || FAILED=1
    ROWS+=("| $name | $1 | $((SECONDS - t0)) | $limit | $(note "$name" "$log") |")
    # shellcheck disable=SC2016  # literal backticks
    { printf '\n## %s: %s, %s s\n\n`%s`\n\n````text\n' "$name" "$1" "$((SECONDS - t0))" "${shown#x }"
      clip "$log"; printf '````\n'; } >>"$TMP/body.md"
    write_results
}
step() {  # NAME CAP CMD...: run under a timeout, log, record
    name=$1 t0=$SECONDS limit=$(($2 < BUDGET - SECONDS ? $2 : BUDGET - SECONDS)) log=$TMP/$1.log; shift 2; shown=$*
    if [[ ,${GPU_CHECK_SKIP:-}, == *",$name,"* ]]; then ROWS+=("| $name | skipped | 0 | - | GPU_CHECK_SKIP |"); return; fi
    if ((limit < 20)); then ROWS+=("| $name | skipped | 0 | - | budget spent |"); FAILED=1; return; fi
    echo "=== $name (timeout ${limit}s): ${shown#x }" >&2
    : >"$log"; timeout -k 10 "$limit" bash -c "$DEFS"$'\n''"$@"' _ "$@" </dev/null >"$log" 2>&1 & TPID=$!
    tail -n +1 -f --pid="$TPID" "$log" >&2 & local tail_pid=$!
    wait "$TPID"; local rc=$?; TPID=; wait "$tail_pid"
    local ok=pass; [[ $DRY == 1 ]] && ok="dry run"
    case $rc in 0) record "$ok" ;; 124 | 137) record "TIMEOUT (${limit}s)" ;; *) record "FAIL (rc $rc)" ;; esac
}
trap '[[ -z $TPID ]] || { kill -TERM "$TPID"; wait "$TPID"; record INTERRUPTED; }; exit 130' INT TERM
trap 'rm -rf "$TMP"' EXIT

step env 60 environment
step install 120 install_extras
step tests 150 x "$PY" -m pytest -v -p no:cacheprovider --durations=10 tests/kernels/test_kernel_cuda.py tests/kernels
step bench 120 x "$PY" "${BENCH[@]}"
step train 120 x env NGPU=1 ./run_train.sh --training.steps 20 --compile.enable
step eval 60 x "$PY" benchmarks/eval_throughput.py --device cuda --contexts 256 --batch_size 16  # needs lm-eval in the wheels
step lowp-gemms 90 x "$PY" benchmarks/low_precision.py gemms --reps 10
NANO=assets/hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16
if [[ -d $NANO || $DRY == 1 ]]; then
    step qlora-24gb 300 x env GPU_MEM_GIB=24 torchrun --nproc_per_node=1 benchmarks/memory_capped.py --config_file train_configs/nemotron3-nano-30B-qlora.toml --training.steps 3 --validator.no_enable --checkpoint.no_enable --dataloader.dataset_path "$("$PY" -c 'from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets as a; print(a()[1])')"
else ROWS+=("| qlora-24gb | skipped | 0 | - | no $NANO |"); fi
step bench-compile 180 x "$PY" "${BENCH[@]}" --compile
write_results
echo "results: $OUT ($SECONDS s)" >&2
exit "$FAILED"
