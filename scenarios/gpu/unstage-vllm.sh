#!/usr/bin/env bash
# On the GPU host: stashes the vLLM parts a device call carried, and once every part is there,
# reassembles them, checks the archive against SHA256SUMS and unpacks it.
#
#   scenarios/gpu/unstage-vllm.sh FROM STASH TARGET
#
# FROM: the carried folder (SHA256SUMS and one or more parts of stage-vllm.sh); STASH: a folder
# that outlives the call while the host stays warm (/tmp); TARGET: where the tree goes, for
# PYTHONPATH. Call it once per call that carries parts; it says how many parts it still lacks.
# Exit status 0 when TARGET is ready, 3 while parts are missing, 1 on a bad checksum.
set -euo pipefail

FROM="$1"
STASH="$2"
TARGET="$3"
ARCHIVE=vllm-0.26.0.tar.xz

if [ -f "$TARGET/.unstaged" ]; then
  echo "unstage-vllm: $TARGET already holds the tree"
  exit 0
fi
mkdir -p "$STASH"
cp "$FROM/SHA256SUMS" "$STASH/SHA256SUMS"
for part in "$FROM/$ARCHIVE".part*; do
  [ -e "$part" ] || continue
  cp "$part" "$STASH/"
done
cd "$STASH"
mapfile -t PARTS < <(awk -v a="$ARCHIVE" 'index($2, a ".part") == 1 {print $2}' SHA256SUMS)
missing=0
for part in "${PARTS[@]}"; do
  [ -f "$part" ] || { echo "unstage-vllm: waiting for $part"; missing=1; }
done
[ "$missing" = 0 ] || exit 3
awk -v a="$ARCHIVE" 'index($2, a ".part") == 1' SHA256SUMS | sha256sum --quiet -c - || exit 1
cat "${PARTS[@]}" > "$ARCHIVE"
awk -v a="$ARCHIVE" '$2 == a' SHA256SUMS | sha256sum --quiet -c - || exit 1
mkdir -p "$TARGET"
xz -dc -T0 "$ARCHIVE" | tar -C "$TARGET" -xf -
rm -f "$ARCHIVE"
touch "$TARGET/.unstaged"
echo "unstage-vllm: unpacked ${#PARTS[@]} parts into $TARGET"
