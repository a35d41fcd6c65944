#!/usr/bin/env bash
# After every slice of dump-part.sh has finished: merge $OUT/part-* into $OUT/merged and
# verify it. The merged folder links (or copies) the parts' shards and has the identity of a
# single-process dump of the same job.
set -euo pipefail
: "${OUT:?}"
shopt -s nullglob
parts=("$OUT"/part-*)
if [ ${#parts[@]} -eq 0 ]; then
    echo "no $OUT/part-* folders" >&2
    exit 1
fi
shard-cat merge --out "$OUT/merged" "${parts[@]}"
shard-cat verify "$OUT/merged"
