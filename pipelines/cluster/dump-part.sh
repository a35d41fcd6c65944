#!/usr/bin/env bash
# One slice of a teacher-dump job: part INDEX of N, into $OUT/part-$INDEX on shared storage.
# The Slurm array, the Kubernetes Indexed Job and run-local.sh all run this script; a
# requeued or restarted task resumes its own slice (--resume), and a finished slice is left
# as it is.
#
#   INDEX      0-based slice index (Slurm: $SLURM_ARRAY_TASK_ID, Kubernetes: $JOB_COMPLETION_INDEX)
#   N          number of slices
#   TEACHER    teacher .gguf file or Hugging Face directory, readable on every node
#   INPUT      prompts JSONL, readable on every node
#   OUT        job folder on shared storage
#   DUMP_ARGS  further teacher-dump flags, the same for every slice (e.g. "--top-k 32")
set -euo pipefail
: "${INDEX:?}" "${N:?}" "${TEACHER:?}" "${INPUT:?}" "${OUT:?}"
part="$OUT/part-$INDEX"
if [ -f "$part/manifest.json" ]; then
    echo "part $INDEX/$N already complete: $part"
    exit 0
fi
resume=()
if [ -d "$part" ]; then
    resume=(--resume)
fi
# shellcheck disable=SC2086  # DUMP_ARGS is a list of flags
exec teacher-dump --teacher "$TEACHER" --input "$INPUT" --out "$part" \
    --part "$INDEX/$N" --no-progress "${resume[@]}" ${DUMP_ARGS:-}
