#!/usr/bin/env bash
# The cluster recipe on one machine: N slices of dump-part.sh side by side, then merge.sh.
# Same environment as dump-part.sh (TEACHER, INPUT, OUT, N, DUMP_ARGS); THREADS_PER_PART
# sets each slice's --threads (default 1).
set -euo pipefail
: "${N:?}" "${OUT:?}"
here="$(cd "$(dirname "$0")" && pwd)"
pids=()
for ((i = 0; i < N; i++)); do
    INDEX=$i DUMP_ARGS="${DUMP_ARGS:-} --threads ${THREADS_PER_PART:-1}" "$here/dump-part.sh" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do
    wait "$p" || status=1
done
if [ $status -ne 0 ]; then
    echo "a slice failed; rerun to resume the unfinished ones" >&2
    exit 1
fi
"$here/merge.sh"
