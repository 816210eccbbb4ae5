#!/usr/bin/env bash
# GRPO + LoRA + R3 + AQN on Qwen3-30B-A3B with MindSpeed-RL, launched the way MindSpeed-RL's examples are.
#
# Run the same command on every node. Every node first checks what is cheap to check (arguments, config, paths,
# ray and python in PATH, the NPU count npu-smi reports); the head (NODE_RANK 0) also checks the layout with
# `mindspeed-rl-r3 plan`. Only then does anything start: the head starts its own Ray head on port 6766, waits until
# `ray status` shows all NNODES x NPUS_PER_NODE NPUs, runs the training entry, and stops the Ray head it started when
# training ends, fails or is interrupted. Other nodes join the head's Ray cluster and return; their Ray daemons exit
# once the head is gone. The launcher never stops a Ray it did not start: if port 6766 is taken, it says so.
#
#   NNODES=2 NPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=10.0.0.1 \
#   MODEL_PATH=/models/Qwen3-30B-A3B LOAD_PATH=/ckpt/Qwen3-30B-A3B-mcore-tp4-pp2-ep2 \
#   DATA_PATH=/data/gsm8k/data MINDSPEED_RL_DIR=/opt/MindSpeed-RL \
#   CONFIG_NAME=grpo_qwen3_30b_a3b_lora_r3_aqn_A2_2x8 bash examples/qwen3_30b_lora_r3_aqn.sh
#
# (LOAD_PATH must hold weights converted for the config's TP/PP/EP: TP 4, PP 2, EP 2 for the A2_2x8 config.)
#
# Options: --dry-run (run every check, plan included, then print what would run; start, stop and create nothing),
# --config-name NAME, -h | --help.
# Arguments after `--` go to the entry (and to `plan`) as hydra overrides, e.g. `-- rl_config.n_samples_per_prompt=4`.
#
# Variables (environment overrides; defaults in brackets):
#   NNODES [1], NPUS_PER_NODE [16], NODE_RANK [0], MASTER_ADDR [localhost; the head's IP when NNODES > 1]
#   MODEL_PATH        Hugging Face model directory (tokenizer and config.json)                      required
#   DATA_PATH         prefix of MindSpeed-RL's preprocessed data (<prefix>_packed_*_document.idx)   required
#   MINDSPEED_RL_DIR  MindSpeed-RL checkout (with megatron/ and mindspeed_llm/ as its guide installs) required
#   LOAD_PATH         Megatron-format checkpoint for the config's TP/PP/EP  [the config's actor_config.load]
#   SAVE_PATH [the config's actor_config.save], CONFIG_NAME [grpo_qwen3_30b_a3b_lora_r3_aqn],
#   CONFIG_DIR [<repo>/configs], LOG_DIR [<repo>/logs], PYTHON [python3], NODE_IP [first of `hostname -I`],
#   RAY_PORT [6766], RAY_DASHBOARD_PORT [8260], WAIT_TIMEOUT [1800 s], SKIP_PLAN [0]
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

NNODES="${NNODES:-1}"
NPUS_PER_NODE="${NPUS_PER_NODE:-16}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MODEL_PATH="${MODEL_PATH:-}"
DATA_PATH="${DATA_PATH:-}"
MINDSPEED_RL_DIR="${MINDSPEED_RL_DIR:-}"
LOAD_PATH="${LOAD_PATH:-}"
SAVE_PATH="${SAVE_PATH:-}"
CONFIG_NAME="${CONFIG_NAME:-grpo_qwen3_30b_a3b_lora_r3_aqn}"
CONFIG_DIR="${CONFIG_DIR:-$REPO_ROOT/configs}"
LOG_DIR="${LOG_DIR:-$REPO_ROOT/logs}"
PYTHON="${PYTHON:-python3}"
NODE_IP="${NODE_IP:-}"
RAY_PORT="${RAY_PORT:-6766}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8260}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-1800}"
SKIP_PLAN="${SKIP_PLAN:-0}"
DRY_RUN=0
OVERRIDES=()

die() {
  echo "error: $*" >&2
  exit 1
}
usage_error() {
  echo "error: $*" >&2
  echo "usage: $(basename "$0") [--dry-run] [--config-name NAME] [-- hydra overrides...]  (see --help)" >&2
  exit 2
}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# Print a command (dry run) or run it.
run() {
  if ((DRY_RUN)); then
    printf '[dry-run]'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
note() { if ((DRY_RUN)); then echo "[dry-run] $*"; else echo "[launch] $*"; fi; }
set_env() {
  export "$1=$2"
  if ((DRY_RUN)); then printf '[dry-run] export %s=%q\n' "$1" "$2"; fi
}
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac }

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --config-name)
      (($# >= 2)) || usage_error "--config-name needs a value"
      CONFIG_NAME="$2"
      shift
      ;;
    --config-name=*) CONFIG_NAME="${1#*=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      OVERRIDES=("$@")
      break
      ;;
    *) usage_error "unknown argument '$1'" ;;
  esac
  shift
done

# ---- arguments
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || usage_error "NNODES must be a positive integer, got '$NNODES'"
[[ $NPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || usage_error "NPUS_PER_NODE must be a positive integer, got '$NPUS_PER_NODE'"
[[ $NODE_RANK =~ ^[0-9]+$ ]] || usage_error "NODE_RANK must be a non-negative integer, got '$NODE_RANK'"
((NODE_RANK < NNODES)) || usage_error "NODE_RANK $NODE_RANK is out of range for NNODES $NNODES (0..$((NNODES - 1)))"
[[ $WAIT_TIMEOUT =~ ^[0-9]+$ ]] || usage_error "WAIT_TIMEOUT must be seconds, got '$WAIT_TIMEOUT'"
if ((NNODES > 1)) && [[ -z $MASTER_ADDR || $MASTER_ADDR == localhost || $MASTER_ADDR == 127.* ]]; then
  usage_error "NNODES=$NNODES needs MASTER_ADDR set to the head node's address (got '$MASTER_ADDR')"
fi
WORLD=$((NNODES * NPUS_PER_NODE))

CONFIG_NAME="${CONFIG_NAME%.yaml}"
CONFIG_DIR="$(abspath "$CONFIG_DIR")"
CONFIG_FILE="$CONFIG_DIR/$CONFIG_NAME.yaml"
if [[ ! -f $CONFIG_FILE ]]; then
  available=""
  for candidate in "$CONFIG_DIR"/*.yaml; do
    [[ -f $candidate ]] && available+="$(basename "$candidate" .yaml) "
  done
  die "config '$CONFIG_NAME' not found: no $CONFIG_FILE (CONFIG_DIR has: ${available:-no configs})"
fi

# ---- paths: every node checks them, so a missing mount on a worker fails here and not inside a Ray actor
[[ -n $MINDSPEED_RL_DIR ]] || die "MINDSPEED_RL_DIR is not set: point it at the MindSpeed-RL checkout"
MINDSPEED_RL_DIR="$(abspath "$MINDSPEED_RL_DIR")"
[[ -d $MINDSPEED_RL_DIR ]] || die "MINDSPEED_RL_DIR=$MINDSPEED_RL_DIR does not exist"
[[ -d $MINDSPEED_RL_DIR/mindspeed_rl ]] ||
  die "MINDSPEED_RL_DIR=$MINDSPEED_RL_DIR is not a MindSpeed-RL checkout (no mindspeed_rl/ package in it)"

[[ -n $MODEL_PATH ]] || die "MODEL_PATH is not set: point it at the Hugging Face Qwen3-30B-A3B directory"
MODEL_PATH="$(abspath "$MODEL_PATH")"
[[ -d $MODEL_PATH ]] || die "MODEL_PATH=$MODEL_PATH does not exist"
[[ -f $MODEL_PATH/config.json ]] || die "MODEL_PATH=$MODEL_PATH has no config.json (expected a Hugging Face model dir)"

[[ -n $DATA_PATH ]] || die "DATA_PATH is not set: the output_prefix given to MindSpeed-RL's preprocess_data.py"
DATA_PATH="$(abspath "$DATA_PATH")"
for field in input_ids labels; do
  [[ -f ${DATA_PATH}_packed_${field}_document.idx && -f ${DATA_PATH}_packed_${field}_document.bin ]] ||
    die "DATA_PATH=$DATA_PATH: missing ${DATA_PATH}_packed_${field}_document.{bin,idx}; convert GSM8K" \
      "(mindspeed-rl-r3 gsm8k convert) and run MindSpeed-RL's cli/preprocess_data.py with" \
      "configs/datasets/gsm8k_qwen3.yaml (output_prefix = DATA_PATH, dataset_additional_keys: [labels])"
done

if [[ -n $LOAD_PATH ]]; then
  LOAD_PATH="$(abspath "$LOAD_PATH")"
  [[ -d $LOAD_PATH ]] || die "LOAD_PATH=$LOAD_PATH does not exist (Megatron-format weights for the config's TP/PP/EP)"
fi
[[ -z $SAVE_PATH ]] || SAVE_PATH="$(abspath "$SAVE_PATH")"
LOG_DIR="$(abspath "$LOG_DIR")"
for value in "$MODEL_PATH" "$DATA_PATH" "$LOAD_PATH" "$SAVE_PATH"; do
  [[ $value != *"'"* ]] || die "path '$value' contains a single quote, which hydra overrides cannot carry"
done

if [[ -z $NODE_IP ]]; then
  NODE_IP="$(hostname -I 2>/dev/null | awk '{print $1}')" || NODE_IP=""
fi
NODE_IP_ARGS=()
[[ -z $NODE_IP ]] || NODE_IP_ARGS=(--node-ip-address="$NODE_IP")
NPU_RESOURCES="{\"NPU\": $NPUS_PER_NODE}"

role=worker
((NODE_RANK == 0)) && role=head
note "$role node $NODE_RANK of $NNODES, $NPUS_PER_NODE NPUs per node, $WORLD NPUs in total," \
  "Ray head $MASTER_ADDR:$RAY_PORT, config $CONFIG_FILE"

# ---- tools and NPUs: checked in a dry run too, so a dry run that passes means the launch gets this far
command -v ray >/dev/null || die "ray is not in PATH (activate the MindSpeed-RL environment)"
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON is not in PATH"
if command -v npu-smi >/dev/null; then
  # `npu-smi info -l` starts with "Total Count : N".
  npus="$(npu-smi info -l 2>/dev/null | awk -F: '/Total Count/ { gsub(/[ \t]/, "", $2); print $2; exit }')" || npus=""
  if [[ $npus =~ ^[0-9]+$ ]]; then
    ((npus >= NPUS_PER_NODE)) || die "npu-smi sees $npus NPUs on this node, NPUS_PER_NODE is $NPUS_PER_NODE"
  else
    note "could not read the NPU count from 'npu-smi info -l': NPUS_PER_NODE=$NPUS_PER_NODE not checked"
  fi
else
  note "npu-smi is not in PATH: NPUS_PER_NODE=$NPUS_PER_NODE not checked against this node"
fi

# ---- layout (head only): fails fast on layouts MindSpeed-RL / Megatron would reject after minutes of start-up
if ((NODE_RANK == 0)) && [[ $SKIP_PLAN != 1 ]]; then
  plan_status=0
  plan_out="$(PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m mindspeed_rl_r3.cli.main plan \
    "$CONFIG_FILE" ${OVERRIDES[@]+"${OVERRIDES[@]}"} --npus "$WORLD" --nnodes "$NNODES" 2>&1)" || plan_status=$?
  printf '%s\n' "$plan_out" | sed 's/^/[plan] /'
  ((plan_status == 0)) ||
    die "plan rejected $CONFIG_FILE for $NNODES x $NPUS_PER_NODE NPUs (see [plan] above; SKIP_PLAN=1 skips this check)"
fi

# ---- the head's port must be free: a Ray cluster already there belongs to someone else, and `ray status` would
# report its NPUs as ours
if ((NODE_RANK == 0)) && (exec 3<>"/dev/tcp/127.0.0.1/$RAY_PORT") 2>/dev/null; then
  die "port $RAY_PORT on this node is in use (another Ray cluster?); this launcher stops only the Ray it starts:" \
    "stop that one yourself if it is yours (\`ray stop\`), or set RAY_PORT to a free port"
fi

# ---- environment (MindSpeed-RL's launch settings; worker processes get configs/envs/runtime_env.yaml too)
set_env PYTHONPATH "$MINDSPEED_RL_DIR:$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
set_env RAY_DEDUP_LOGS 0
set_env HYDRA_FULL_ERROR 1
set_env TASK_QUEUE_ENABLE 2
set_env HCCL_IF_BASE_PORT 24703
set_env LCAL_COMM_ID 127.0.0.1:27001
set_env MALLOC_MMAP_THRESHOLD_ 512768
jemalloc=""
for candidate in /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \
  /usr/local/lib/libjemalloc.so.2; do
  if [[ -f $candidate ]]; then
    jemalloc="$candidate"
    break
  fi
done
if [[ -n $jemalloc ]]; then
  set_env LD_PRELOAD "$jemalloc${LD_PRELOAD:+:$LD_PRELOAD}"
else
  note "libjemalloc.so.2 not found: LD_PRELOAD left unchanged (host memory fragments more without it)"
fi
if ((!DRY_RUN)); then
  ulimit -n 32768 2>/dev/null || echo "[launch] warning: could not raise the open-file limit to 32768" >&2
fi

if ((NODE_RANK != 0)); then
  # Worker: wait until the head answers, then join it once (a retried `ray start` could start a second raylet).
  if ((DRY_RUN)); then
    note "wait (every 5 s, up to $WAIT_TIMEOUT s) until the Ray head at $MASTER_ADDR:$RAY_PORT answers"
    run ray start --address="$MASTER_ADDR:$RAY_PORT" --resources="$NPU_RESOURCES" ${NODE_IP_ARGS[@]+"${NODE_IP_ARGS[@]}"}
    exit 0
  fi
  deadline=$((SECONDS + WAIT_TIMEOUT))
  until ray status --address="$MASTER_ADDR:$RAY_PORT" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "the Ray head at $MASTER_ADDR:$RAY_PORT did not answer within $WAIT_TIMEOUT s"
    echo "[launch] head $MASTER_ADDR:$RAY_PORT not ready, retrying in 5 s"
    sleep 5
  done
  ray start --address="$MASTER_ADDR:$RAY_PORT" --resources="$NPU_RESOURCES" ${NODE_IP_ARGS[@]+"${NODE_IP_ARGS[@]}"} ||
    die "could not join the Ray head at $MASTER_ADDR:$RAY_PORT (is a Ray node of another job running here?)"
  echo "[launch] joined the Ray cluster at $MASTER_ADDR:$RAY_PORT with $NPUS_PER_NODE NPUs"
  exit 0
fi

# ---- head: start our own Ray head, wait for every NPU, train, stop the head
# `ray start --block` stays in the foreground of its own process and, on SIGTERM, stops exactly the Ray processes it
# started: keeping its pid is how this script stops its head and nothing else (`ray stop` would stop every Ray
# cluster of this user on the node).
RAY_HEAD_PID=""
stop_own_ray_head() {
  [[ -n $RAY_HEAD_PID ]] || return 0
  if kill -0 "$RAY_HEAD_PID" 2>/dev/null; then
    echo "[launch] stopping the Ray head this launch started (pid $RAY_HEAD_PID)" >&2
    kill -TERM "$RAY_HEAD_PID" 2>/dev/null || true
  fi
  wait "$RAY_HEAD_PID" 2>/dev/null || true
  RAY_HEAD_PID=""
}
HEAD_CMD=(ray start --head --block --port "$RAY_PORT" --dashboard-host="$MASTER_ADDR"
  --dashboard-port="$RAY_DASHBOARD_PORT" --resources="$NPU_RESOURCES" ${NODE_IP_ARGS[@]+"${NODE_IP_ARGS[@]}"})

if ((DRY_RUN)); then
  run "${HEAD_CMD[@]}"
  note "(in the background; stopped when this script exits, training failed or not)"
  note "wait until 'ray status' shows $WORLD NPU (timeout $WAIT_TIMEOUT s)"
else
  trap stop_own_ray_head EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  "${HEAD_CMD[@]}" &
  RAY_HEAD_PID=$!
  deadline=$((SECONDS + WAIT_TIMEOUT))
  while :; do
    if ! kill -0 "$RAY_HEAD_PID" 2>/dev/null; then
      head_status=0
      wait "$RAY_HEAD_PID" || head_status=$?
      RAY_HEAD_PID=""
      die "'ray start --head' exited (status $head_status) before the cluster was ready (its output is above)"
    fi
    # `ray status` lists resources as "used/total NPU", e.g. " 0.0/16.0 NPU".
    visible="$(ray status --address="$MASTER_ADDR:$RAY_PORT" 2>/dev/null |
      awk '$2 == "NPU" { split($1, a, "/"); print int(a[2]); exit }')" || visible=""
    visible="${visible:-0}"
    if ((visible >= WORLD)) && kill -0 "$RAY_HEAD_PID" 2>/dev/null; then
      echo "[launch] Ray cluster ready: $visible NPUs"
      break
    fi
    ((SECONDS < deadline)) ||
      die "only $visible of $WORLD NPUs joined within $WAIT_TIMEOUT s: start this script on every node" \
        "(NODE_RANK 1..$((NNODES - 1))) with MASTER_ADDR=$MASTER_ADDR"
    echo "[launch] waiting for NPUs: $visible of $WORLD visible"
    sleep 5
  done
fi

TRAIN_CMD=("$PYTHON" -m mindspeed_rl_r3.train --config-path "$CONFIG_DIR" --config-name "$CONFIG_NAME"
  "megatron_training.tokenizer_name_or_path='$MODEL_PATH'" "megatron_training.data_path='$DATA_PATH'")
[[ -z $LOAD_PATH ]] || TRAIN_CMD+=("actor_config.load='$LOAD_PATH'")
[[ -z $SAVE_PATH ]] || TRAIN_CMD+=("actor_config.save='$SAVE_PATH'")
TRAIN_CMD+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
[[ -n $LOAD_PATH ]] || note "LOAD_PATH not set: actor_config.load comes from $CONFIG_NAME.yaml"

run cd "$MINDSPEED_RL_DIR"
LOG_FILE="$LOG_DIR/${CONFIG_NAME}_$(date +%Y%m%d_%H%M%S).log"
if ((DRY_RUN)); then
  run "${TRAIN_CMD[@]}"
  note "log: $LOG_FILE"
  exit 0
fi
mkdir -p "$LOG_DIR"
echo "[launch] training, log: $LOG_FILE"
train_status=0
"${TRAIN_CMD[@]}" 2>&1 | tee "$LOG_FILE" || train_status=$?
((train_status == 0)) || echo "[launch] training failed (exit status $train_status), log: $LOG_FILE" >&2
exit "$train_status"
