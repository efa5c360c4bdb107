#!/usr/bin/env bash
# Run `python -m bmgpt_jax.train ARGS` on several GPU nodes: one process per node (it drives all the
# node's GPUs) or, with --per-gpu, one process per GPU. Process 0's host is the JAX coordinator.
#
#   launch/gpu_multinode.sh --hosts node0,node1[,...] [--gpus-per-node 8] [--per-gpu] [--port 12355] \
#                           [--dir REPO_ON_NODES] [--python python] [--dry-run] -- [train arguments...]
#   launch/gpu_multinode.sh --slurm [--nodes N] [--gpus-per-node 8] [--per-gpu] [--port 12355] \
#                           [--dir REPO_ON_NODES] [--python python] [--dry-run] -- [train arguments...]
#                           (inside an salloc/sbatch job)
#
# ssh mode: each process gets JAX_COORDINATOR_ADDRESS=<first host>:PORT, JAX_NUM_PROCESSES, JAX_PROCESS_ID
# (and CUDA_VISIBLE_DEVICES=<gpu> with --per-gpu); hosts named localhost/127.x run without ssh. Name the
# first host as the others reach it (a user@ is dropped; a first localhost becomes `hostname -f`).
# slurm mode: srun starts the tasks; bmgpt_jax.distributed reads SLURM_NTASKS/SLURM_PROCID and the
# coordinator exported here (the step's first node, where task 0 runs). Either mode runs every process in
# --dir (default: this checkout). --dry-run prints the commands, runs nothing.
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }
need_value() { [[ -n "${2-}" && "$2" != --* ]] || die "$1 needs a value${2:+, not $2}"; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 takes a positive whole number, not $2"; }

HOSTS="" SLURM=0 NODES="" GPUS=8 PER_GPU=0 PORT=12355 DRY=0 PYTHON="python"
DIR="$(cd "$(dirname "$0")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) need_value "$@"; HOSTS="$2"; shift 2 ;;
    --slurm) SLURM=1; shift ;;
    --nodes) need_value "$@"; positive "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; positive "$@"; GPUS="$2"; shift 2 ;;
    --per-gpu) PER_GPU=1; shift ;;
    --port) need_value "$@"; positive "$@"; PORT="$2"; shift 2 ;;
    --dir) need_value "$@"; DIR="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "gpu_multinode.sh: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
(( ${#PORT} <= 5 && PORT <= 65535 )) || die "--port $PORT is not a port (1-65535)"

quote() {  # one word as the shell reads it back: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
remote_word() {  # quote(), but a leading ~/ stays outside the quotes for the node's shell to expand
  case "$1" in
    "~/"?*) printf '~/%s' "$(quote "${1#"~/"}")" ;;
    *) quote "$1" ;;
  esac
}
TRAIN="$(remote_word "$PYTHON") -m bmgpt_jax.train"
for a in "$@"; do TRAIN+=" $(quote "$a")"; done
PROCS_PER_NODE=1
[[ $PER_GPU -eq 1 ]] && PROCS_PER_NODE=$GPUS

if [[ $SLURM -eq 1 ]]; then
  [[ -z "$HOSTS" ]] || die "--hosts and --slurm exclude each other (under --slurm, srun runs on the job's nodes)"
  NODES="${NODES:-${SLURM_JOB_NUM_NODES:-}}"
  [[ -n "$NODES" ]] || { echo "gpu_multinode.sh: --slurm needs --nodes N (or run inside a SLURM job)" >&2; exit 2; }
  SRUN=(srun --nodes="$NODES" --ntasks-per-node="$PROCS_PER_NODE")
  [[ $PER_GPU -eq 1 ]] && SRUN+=(--gpus-per-task=1)
  # the step's first node runs task 0 (a step may hold only some of the job's nodes)
  FIRST_NODE="\$(scontrol show hostnames \"\${SLURM_STEP_NODELIST:-\$SLURM_JOB_NODELIST}\" | head -n1)"
  INNER="cd $(remote_word "$DIR") && export JAX_COORDINATOR_ADDRESS=$FIRST_NODE:$PORT && exec $TRAIN"
  echo "${SRUN[*]} bash -c $(quote "$INNER")"
  [[ $DRY -eq 1 ]] || exec "${SRUN[@]}" bash -c "$INNER"
  exit 0
fi

[[ -n "$HOSTS" ]] || { echo "gpu_multinode.sh: give --hosts h0,h1,... or --slurm" >&2; usage 2; }
[[ -z "$NODES" ]] || die "--nodes goes with --slurm (with --hosts, each host is a node)"
[[ ",$HOSTS," != *,,* ]] || die "--hosts $HOSTS has an empty entry"
[[ "$HOSTS" != *[[:space:]]* ]] || die "--hosts '$HOSTS' has a space: give h0,h1,... as one word"
IFS=, read -r -a HOST_LIST <<< "$HOSTS"
loopback() { [[ "$1" == localhost || "$1" == localhost.* || "$1" == 127.* ]]; }  # run here, without ssh
# The coordinator is the first host as every process reaches it: without ssh's user@, and under this
# machine's name, not localhost, when another host is remote.
COORD="${HOST_LIST[0]#*@}"
if loopback "$COORD"; then
  for host in "${HOST_LIST[@]}"; do
    loopback "${host#*@}" && continue
    COORD="$(hostname -f 2>/dev/null || true)"
    if [[ -z "$COORD" ]] || loopback "$COORD"; then
      die "the first host (${HOST_LIST[0]}) is the coordinator $host connects to, and hostname -f gives this" \
          "machine no other name: put first a host named as the others reach it"
    fi
    break
  done
fi
WORLD=$(( ${#HOST_LIST[@]} * PROCS_PER_NODE ))
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' INT TERM
rank=0
for host in "${HOST_LIST[@]}"; do
  for (( gpu = 0; gpu < PROCS_PER_NODE; gpu++ )); do
    ENVS="JAX_COORDINATOR_ADDRESS=$COORD:$PORT JAX_NUM_PROCESSES=$WORLD JAX_PROCESS_ID=$rank"
    [[ $PER_GPU -eq 1 ]] && ENVS+=" CUDA_VISIBLE_DEVICES=$gpu"
    CMD="cd $(remote_word "$DIR") && $ENVS $TRAIN"
    if loopback "$host"; then LAUNCH=(bash -c "$CMD"); else LAUNCH=(ssh "$host" "$CMD"); fi
    echo "${LAUNCH[0]} ${LAUNCH[1]} $(quote "${LAUNCH[2]}")"
    if [[ $DRY -eq 0 ]]; then "${LAUNCH[@]}" & PIDS+=($!); fi
    rank=$(( rank + 1 ))
  done
done
status=0
for p in "${PIDS[@]}"; do wait "$p" || status=$?; done
exit $status
