#!/usr/bin/env bash
# Pack this checkout into a gzipped tarball to copy to other hosts (what launch/tpu_pod.sh --sync sends):
#
#   launch/pack.sh OUT.tar.gz
#   launch/pack.sh --dry-run OUT.tar.gz    # list the files it would pack, one a line; write nothing
#
# In a git checkout: the tracked files and the untracked ones git does not ignore (your uncommitted edits
# and new files), never what .gitignore names (.venv/, runs/, .jax_cache/, build outputs). Outside git:
# every file but .git/, .venv/, runs/, .jax_cache/ and __pycache__/. Either way never OUT: it is written
# outside the tree and moved there at the end, and one inside the tree (an earlier pack) is left out.
set -euo pipefail
DRY=0
if [[ "${1:-}" == --dry-run ]]; then DRY=1; shift; fi
[[ $# -eq 1 && "$1" != -* ]] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
OUT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
REAL_OUT="$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")"
cd "$(dirname "$0")/.."
SELF="${REAL_OUT#"$(pwd -P)"/}"   # OUT's path in the tree when it lies there (an earlier pack): never packed
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  listed() { git ls-files -z --cached --others --exclude-standard; }
else
  listed() {
    find . \( -path ./.git -o -path ./.venv -o -path ./runs -o -path ./.jax_cache -o -name __pycache__ \) \
      -prune -o ! -type d -print0
  }
fi
files() {  # what listed() names and is there to pack (a tracked file deleted in the work tree is not), OUT aside
  listed | while IFS= read -r -d '' f; do
    if [[ ( -e "$f" || -L "$f" ) && "${f#./}" != "$SELF" ]]; then printf '%s\0' "$f"; fi
  done
}
if [[ $DRY -eq 1 ]]; then
  LIST="$(files | tr '\0' '\n' | sed 's|^\./||' | LC_ALL=C sort)"
  if [[ -n "$LIST" ]]; then printf '%s\n' "$LIST"; fi
  echo "pack.sh: dry run: $(printf '%s' "$LIST" | grep -c '') files would go in $OUT (nothing written)" >&2
  exit 0
fi
# written outside the tree, then moved to OUT: tar never reads the archive it is writing
TMP="$(mktemp -d "${TMPDIR:-/tmp}/pack.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
files | tar --null -T - -czf "$TMP/pack.tar.gz"
mv -f "$TMP/pack.tar.gz" "$OUT"
echo "pack.sh: $(tar -tzf "$OUT" | wc -l) files in $OUT" >&2
