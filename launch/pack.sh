#!/usr/bin/env bash
# Pack this checkout into a gzipped tarball to copy to other hosts (what launch/tpu_pod.sh --sync sends):
#
#   launch/pack.sh OUT.tar.gz
#
# In a git checkout: the tracked files and the untracked ones git does not ignore (your uncommitted edits
# and new files), never what .gitignore names (.venv/, runs/, .jax_cache/, build outputs). Outside git:
# every file but .git/, .venv/, runs/, .jax_cache/ and __pycache__/.
set -euo pipefail
[[ $# -eq 1 && "$1" != -* ]] || { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
cd "$(dirname "$0")/.."
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # a tracked file deleted in the work tree is listed by git but not there to pack: skip it
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
    | tar --null -T - -czf "$OUT"
else
  tar --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./.jax_cache --exclude=__pycache__ \
    -czf "$OUT" .
fi
echo "pack.sh: $(tar -tzf "$OUT" | wc -l) files in $OUT" >&2
