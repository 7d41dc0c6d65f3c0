#!/usr/bin/env bash
# Launch TorchTitan training of a NemotronH model from a TOML job file.
#
#   NGPU=8 CONFIG_FILE=train_configs/nemotron3-nano-30B.toml ./run_train.sh [--section.field VALUE ...]
#
# Environment:
#   NGPU         processes per node (GPUs; on a machine without CUDA, CPU ranks
#                over gloo)                                   default 1
#   CONFIG_FILE  TOML job file (relative to $PWD, else to this repo)
#                                                   default train_configs/debug_model.toml
#   LOG_RANK     comma-separated local ranks whose output is shown   default 0
#   Multi-node, torchrun's usual rendezvous variables:
#     NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   static rendezvous
#     RDZV_ENDPOINT [, RDZV_ID, RDZV_BACKEND=c10d]  dynamic (elastic) rendezvous
#   TORCHRUN     launcher command   default: torchrun through
#                torchtitan_nemotron3.resilience.launch (the same, but a failed
#                attempt is one line and the root cause is printed once, at the end)
#   MAX_RESTARTS torchrun --max-restarts: after a rank fails, restart all ranks up
#                to this many times; each attempt resumes from the newest
#                complete checkpoint (torchtitan_nemotron3/resilience)  default 0
#   CHECK_JOB    1: check the job in one plain process before torchrun (a bad job
#                is one line, not one traceback per rank; ~10 s of imports);
#                0: skip it (the ranks run the same checks)   default 1
# Extra arguments are passed to `python -m torchtitan_nemotron3.train`: TorchTitan's
# own --section.field VALUE flags (the same as `torchrun -m torchtitan.train`'s),
# applied after the file's. `--help` lists them and `--print_config` prints the
# resolved config; both run one plain process, without torchrun. Relative paths
# resolve against the directory you run this from.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
LOG_RANK=${LOG_RANK:-0}
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
if [[ -n "${TORCHRUN:-}" ]]; then
    LAUNCH=("$TORCHRUN")
else
    LAUNCH=("${PYTHON:-python}" "$ROOT/torchtitan_nemotron3/resilience/launch.py")
fi

if [[ ! -f "$CONFIG_FILE" && -f "$ROOT/$CONFIG_FILE" ]]; then
    CONFIG_FILE="$ROOT/$CONFIG_FILE"
fi
if [[ ! -f "$CONFIG_FILE" ]]; then
    echo "run_train.sh: CONFIG_FILE not found: $CONFIG_FILE" >&2
    exit 2
fi

# Import this checkout's package (and test configs) without requiring an install.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for arg in "$@"; do
    case "$arg" in
        -h|--help|--print_config)
            exec "${PYTHON:-python}" -m torchtitan_nemotron3.train --config_file "$CONFIG_FILE" "$@" ;;
    esac
done

# Check the job in one plain process first: a bad file, key, value, parallelism,
# dataset or a missing tokenizer is one line here, before torchrun starts any rank.
if [[ "${CHECK_JOB:-1}" != 0 ]] && ! check_log=$("${PYTHON:-python}" -m torchtitan_nemotron3.train \
        --config_file "$CONFIG_FILE" "$@" --print_config 2>&1 >/dev/null); then
    # The logged ERROR line (or an exception's last line), not import-time warnings
    # that merely mention an error (torchao's deprecation notices do).
    printf '%s\n' "$check_log" | grep -E " ERROR |^[A-Za-z_.]*Error: " >&2 \
        || printf '%s\n' "$check_log" >&2
    exit 2
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
    RDZV_ARGS=(--nnodes "$NNODES" --rdzv_backend "${RDZV_BACKEND:-c10d}"
               --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-torchtitan_nemotron3}")
elif [[ -n "${MASTER_ADDR:-}" || "$NNODES" != 1 ]]; then
    RDZV_ARGS=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}"
               --master_addr "${MASTER_ADDR:-localhost}" --master_port "${MASTER_PORT:-29500}")
else
    # Single node: let c10d pick a free port so concurrent jobs do not collide.
    RDZV_ARGS=(--nnodes 1 --rdzv_backend c10d --rdzv_endpoint "localhost:0")
fi

# Restarts: a fresh rendezvous store per attempt. With torchrun's shared store
# (the default) a restarted attempt can read the previous one's stale gloo/NCCL
# addresses and fail or hang (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# Ignored on CPU; without CUDA the entry point applies cpu_compat (gloo, CPU device).
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}

# Preemption: a SIGTERM (Slurm, Kubernetes) is passed to torchrun, which passes it
# to the ranks; they agree on a step, save it, and rank 0 writes it to the marker
# file: then this script exits 0 (torchtitan_nemotron3/resilience/preempt.py).
marker=$(mktemp "${TMPDIR:-/tmp}/nemotron-preempt.XXXXXX")
export NEMOTRON_PREEMPT_MARKER="$marker"

set -x
"${LAUNCH[@]}" --nproc_per_node="$NGPU" "${RDZV_ARGS[@]}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m torchtitan_nemotron3.train --config_file "$CONFIG_FILE" "$@" &
set +x
pid=$!
# The marker says "preempting" before the ranks see the SIGTERM: torchrun also
# sends SIGTERM when a rank fails, which is not a preemption.
trap 'echo preempting > "$marker"; kill -TERM "$pid" 2>/dev/null || true' TERM
trap 'kill -INT "$pid" 2>/dev/null || true' INT
while :; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # else a trapped signal interrupted the wait
done
saved=$(cat "$marker")
if [[ "$saved" =~ ^[0-9]+$ ]]; then
    echo "run_train.sh: preempted; every rank saved step $saved. Launch the job again to resume." >&2
    rc=0
fi
rm -f "$marker"
exit "$rc"
