#!/usr/bin/env bash
# Pack this checkout into a gzipped tarball to copy to other hosts (what launch/tpu_pod.sh --sync sends):
#
#   launch/pack.sh OUT.tar.gz
#   launch/pack.sh --dry-run OUT.tar.gz    # list the files it would pack, one a line; write nothing
#
# In a git checkout: the tracked files and the untracked ones git does not ignore (your uncommitted edits
# and new files), never what .gitignore names (.venv/, runs/, .jax_cache/, build outputs). Outside git:
# every file but .git/, .venv/, runs/, .jax_cache/ and __pycache__/.
set -euo pipefail
DRY=0
if [[ "${1:-}" == --dry-run ]]; then DRY=1; shift; fi
[[ $# -eq 1 && "$1" != -* ]] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
cd "$(dirname "$0")/.."
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # a tracked file deleted in the work tree is listed by git but not there to pack: skip it
  files() {
    git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done
  }
  if [[ $DRY -eq 1 ]]; then
    LIST="$(files | tr '\0' '\n')"
  else
    files | tar --null -T - -czf "$OUT"
  fi
elif [[ $DRY -eq 1 ]]; then   # what the tar below takes (its excludes), files and links only
  LIST="$(find . \( -path ./.git -o -path ./.venv -o -path ./runs -o -path ./.jax_cache -o -name __pycache__ \) \
            -prune -o ! -type d -print | sed 's|^\./||' | LC_ALL=C sort)"
else
  tar --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./.jax_cache --exclude=__pycache__ \
    -czf "$OUT" .
fi
if [[ $DRY -eq 1 ]]; then
  if [[ -n "$LIST" ]]; then printf '%s\n' "$LIST"; fi
  echo "pack.sh: dry run: $(printf '%s' "$LIST" | grep -c '') files would go in $OUT (nothing written)" >&2
  exit 0
fi
echo "pack.sh: $(tar -tzf "$OUT" | wc -l) files in $OUT" >&2
