#!/usr/bin/env bash
# Run `python -m bmgpt_jax.train ARGS` on every host of a Cloud TPU VM slice (one process per host).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--dir ~/bmgpt_jax] [--python python] [--sync] \
#                     [--setup] [--dry-run] -- [train arguments...]
#
# --project  the Google Cloud project of the TPU (default: gcloud's configured one)
# --dir      the checkout on every worker; --python  the interpreter there (e.g. a venv's); one path each
# --sync   copy this checkout (launch/pack.sh: what git carries, no .venv/runs/caches) into DIR on every
#          worker first, over what is there
# --setup  pip install -e '.[tpu]' in DIR on every worker first
# --dry-run  print the gcloud commands, run nothing
#
# Every worker runs the same command; BMGPT_DISTRIBUTED=auto makes bmgpt_jax.distributed.initialize()
# read the coordinator, process count and process id from the TPU metadata (jax.distributed.initialize()).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
need_value() { [[ -n "${2-}" && "$2" != --* ]] || die "$1 needs a value${2:+, not $2}"; }

TPU="" ZONE="" PROJECT="" DIR="~/bmgpt_jax" SYNC=0 SETUP=0 DRY=0 PYTHON="python"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need_value "$@"; TPU="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --dir) need_value "$@"; DIR="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1 (train arguments go after --)" >&2; usage 2 ;;
  esac
done
[[ -n "$TPU" && -n "$ZONE" ]] || { echo "tpu_pod.sh: --tpu and --zone are required" >&2; usage 2; }

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
quote() {  # one word as the shell reads it back: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
remote_word() {  # quote(), but a leading ~/ stays outside the quotes for the worker's shell to expand
  case "$1" in
    "~/"?*) printf '~/%s' "$(quote "${1#"~/"}")" ;;
    *) quote "$1" ;;
  esac
}
RDIR="$(remote_word "$DIR")" RPYTHON="$(remote_word "$PYTHON")"
TRAIN_ARGS=""
for a in "$@"; do TRAIN_ARGS+=" $(quote "$a")"; done

run() {  # print the command; execute it unless --dry-run
  local line="" a
  for a in "$@"; do line+="${line:+ }$(quote "$a")"; done
  echo "$line"
  [[ $DRY -eq 1 ]] || "$@"
}

REPO="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $SYNC -eq 1 ]]; then  # one tarball, unpacked in place: a re-sync updates DIR (scp -r would nest a copy)
  PACK="${TMPDIR:-/tmp}/bmgpt_jax_sync.tar.gz"
  run bash "$REPO/launch/pack.sh" "$PACK"
  run gcloud compute tpus tpu-vm scp "$PACK" "$TPU:/tmp/bmgpt_jax_sync.tar.gz" "${GCLOUD_FLAGS[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="mkdir -p $RDIR && tar -xzf /tmp/bmgpt_jax_sync.tar.gz -C $RDIR && rm /tmp/bmgpt_jax_sync.tar.gz"
fi
if [[ $SETUP -eq 1 ]]; then
  run gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="cd $RDIR && $RPYTHON -m pip install -e \".[tpu]\""
fi
run gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all \
  --command="cd $RDIR && BMGPT_DISTRIBUTED=auto $RPYTHON -m bmgpt_jax.train$TRAIN_ARGS"
