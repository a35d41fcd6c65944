#!/usr/bin/env bash
# The distillation study: what each method buys, on two students, and what the cache costs.
#
#   ./pipelines/study.sh            # the full study: about 13 hours on 2 cores (times.tsv has each step's)
#   ./pipelines/study.sh --quick    # about 15 minutes: 8 train / 6 held-out prompts, 2 samples, 600 positions
#
# Flags: --out DIR (default out/study), --positions N (distilled positions each run trains on,
# default 200000), --samples N (responses per training prompt at temperature 1, default 16),
# --sweep-samples N (responses per prompt in the cache sweep's dumps, default --samples: fewer
# makes the sweep's five dumps cheaper; its top-32 format-2 baseline is then a dump and a run
# of its own),
# --max-new-tokens N (teacher and student responses, default 256, so that the teacher's own
# answers end), --heldout FILE (held-out
# prompts from a JSONL file of your own; the training prompts are then every seed task whose
# id is not in it; implies --no-publish), --quick, --no-publish, --device D (cpu, cuda, cuda:N:
# where the dumps, training runs and evaluations run; a cuda device builds the binaries with
# `--features cuda` into target/cuda, see docs/gpu.md; the teacher then computes in the
# dumps' default dtype there, bf16).
#
# A full run with the default --out also publishes: it replaces the files of docs/study/ with
# OUT/results/ and OUT/times.tsv (docs/study/README.md stays), and rewrites the study block of
# docs/study/README.md from them (between the `study:begin` and `study:end` markers), so the
# study's page shows exactly what the study wrote.
#
# 1. Splits the 175 self-instruct seed tasks by a hash of their id into training prompts
#    (~80%) and held-out prompts (the rest): no prompt is in both. With --heldout FILE the
#    held-out prompts are FILE's, and the training prompts the seed tasks not in it (by id).
# 2. Dumps SmolLM2-135M-Instruct's responses to the training prompts: --samples responses per
#    prompt at temperature 1 (rows ID#i) at top-32 in format 2, and the teacher's greedy
#    responses to the held-out prompts at top-64.
# 3. Chooses the layers of two students cut from the teacher, half depth (15 of its 30
#    layers) and 6 layers, with `student-fit --keep-layers auto:N` on the training cache
#    (greedy removal of the layer whose removal raises the forward KL least; OUT/layers/),
#    then trains them, each run on the same number of distilled positions
#    with the same batches and learning-rate schedule, under: SFT on the teacher's responses
#    (α = 0), forward KL, reverse KL, JSD(0.5), the seed recipe (forward KL, τ = 2, α = 0.7),
#    and reverse KL started from that student's SFT result (MiniLLM's practice; its budget
#    comes on top of the SFT run's). Then the cache sweep: the same responses (the same in
#    every dump, since a row's sampling stream depends only on the seed, the id and i)
#    dumped once at top-1024 in format 1, from which top-8, top-32 in format 1 and top-1024
#    in format 2 (the near-full reference) are derived by `shard-cat derive`, and dumped
#    again as sample:12; each timed, and the 6-layer student trained with forward KL from each.
# 4. Evaluates each student's initialisation and every trained student on the held-out
#    shards (top-64, bucket tail), generates greedily for every held-out prompt (ROUGE-L F1
#    against the teacher's answer, the share of answers that end with end-of-turn, their
#    length), and writes OUT/results/ with study-report. OUT/times.tsv holds the seconds of
#    every step that ran.
#
# Every step is skipped when its output is already complete, so an interrupted study
# continues where it stopped (a training run resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS=""
for a in "$@"; do ARGS="$ARGS $a"; done
OUT=out/study
POSITIONS=200000
SAMPLES=16
SWEEP_SAMPLES=""
MAX_NEW=256
LIMIT_TRAIN=""
LIMIT_HELD=""
PUBLISH=1
HELDOUT_FILE=""
DEVICE=""
MAX_NEW_GIVEN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; PUBLISH=0; shift 2 ;;
        --no-publish) PUBLISH=0; shift ;;
        --heldout) HELDOUT_FILE="$2"; PUBLISH=0; shift 2 ;;
        --positions) POSITIONS="$2"; shift 2 ;;
        --samples) SAMPLES="$2"; shift 2 ;;
        --sweep-samples) SWEEP_SAMPLES="$2"; shift 2 ;;
        --max-new-tokens) MAX_NEW="$2"; MAX_NEW_GIVEN=1; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --quick) PUBLISH=0; POSITIONS=600; SAMPLES=2; MAX_NEW=24; MAX_NEW_GIVEN=1; LIMIT_TRAIN="--limit 8"; LIMIT_HELD="--limit 6"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "study.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

[ -n "$SWEEP_SAMPLES" ] || SWEEP_SAMPLES=$SAMPLES
TEACHER=data/models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPTS=data/prompts/self-instruct-seed-tasks.jsonl
BIN=target/release
# The two students: a short name and the number of teacher layers kept (chosen on the
# training cache below, with the words the report uses).
STUDENTS=("15l" "6l")
declare -A KEEP=(["6l"]=6 ["15l"]=15)
declare -A LAYERS=()
declare -A STUDENT_WORDS=()

[ -f "$TEACHER" ] || ./scripts/setup.sh
DEV=()
if [ -n "$DEVICE" ]; then DEV=(--device "$DEVICE"); fi
case "$DEVICE" in
    cuda*)
        BIN=target/cuda/release
        CARGO_TARGET_DIR=target/cuda cargo build --release --workspace --features cuda --bins ;;
    *) cargo build --release --workspace --bins --tests --examples ;;   # as scripts/quickstart.sh: one build
esac
mkdir -p "$OUT/prompts" "$OUT/dumps" "$OUT/runs" "$OUT/evals" "$OUT/pipelines" "$OUT/layers"

# An estimate before the work, from the published study's step times (docs/study/times.tsv,
# its machine and --positions in docs/study/results.json): training scaled by positions, dumps
# by responses per prompt. On a GPU, the rates of a GPU check (KD_GPU_SUMMARY=its
# summary.json) replace the CPU's; without them there is no measured rate to estimate from.
# (--quick, whose prompts are limited, is not estimated.)
[ -n "$LIMIT_TRAIN" ] || python3 - "$POSITIONS" "$SAMPLES" "$DEVICE" "${KD_GPU_SUMMARY:-}" <<'EOF' || true
import json, re, sys
positions, samples, device, gpu = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
r = json.load(open("docs/study/results.json"))
m = re.search(r"--positions (\d+)", r["command"])
pub_pos = int(m.group(1)) if m else 200000
m = re.search(r"--samples (\d+)", r["command"])
pub_samples = int(m.group(1)) if m else 16
t = {"train": 0.0, "dump": 0.0, "other": 0.0}
for line in open("docs/study/times.tsv"):
    what, secs = line.rstrip("\n").split("\t")
    kind = what.split()[0]
    t[kind if kind in t else "other"] += float(secs)
train, dump = t["train"] * positions / pub_pos, t["dump"] * samples / pub_samples
cpu = train + dump + t["other"]
if device.startswith("cuda"):
    if gpu:
        g = json.load(open(gpu))
        fit, tok = g["student_positions_per_s"], g["teacher_dump_tokens_per_s"]
        est = train * fit["6-cpu"] / fit["6-gpu-bf16"] + dump * tok["cpu"] / tok["gpu-bf16"] + t["other"]
        print(f"study: estimated {est / 3600:.1f} h on {device} (the GPU check's rates in {gpu})",
              file=sys.stderr)
    else:
        print(f"study: no estimate for {device}: no measured GPU rates (run scripts/gpu_check.sh "
              f"and pass its summary.json as KD_GPU_SUMMARY); on the CPU this study would take "
              f"about {cpu / 3600:.1f} h", file=sys.stderr)
else:
    print(f"study: estimated {cpu / 3600:.1f} h (the published study's steps on {r['machine']}, "
          f"scaled to --positions {positions} and --samples {samples})", file=sys.stderr)
EOF

# 1. Split by id: held out when the first byte of sha256(id) is below 51 (20%), or, with
#    --heldout FILE, when the id is one of FILE's.
if [ -n "$HELDOUT_FILE" ] && [ ! -f "$HELDOUT_FILE" ]; then
    echo "study.sh: --heldout $HELDOUT_FILE: no such file" >&2
    exit 2
fi
python3 - "$PROMPTS" "$OUT/prompts" "$HELDOUT_FILE" <<'EOF'
import hashlib, json, sys
src, dst, held_file = sys.argv[1], sys.argv[2], sys.argv[3]
train, held = [], []
if held_file:
    held_ids = set()
    for n, line in enumerate(open(held_file, encoding="utf-8"), 1):
        if line.strip():
            rec = json.loads(line)
            if "id" not in rec:
                sys.exit(f"study.sh: {held_file}:{n}: a held-out prompt needs an id")
            held_ids.add(str(rec["id"]))
            held.append(line if line.endswith("\n") else line + "\n")
    for line in open(src, encoding="utf-8"):
        if line.strip() and str(json.loads(line)["id"]) not in held_ids:
            train.append(line)
    if not held:
        sys.exit(f"study.sh: {held_file} holds no prompts")
for line in open(src, encoding="utf-8") if not held_file else []:
    if line.strip():
        rec = json.loads(line)
        (held if hashlib.sha256(rec["id"].encode()).digest()[0] < 51 else train).append(line)
for name, rows in (("train", train), ("heldout", held)):
    with open(f"{dst}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(rows)
print(f"study: {len(train)} training prompts, {len(held)} held-out prompts", file=sys.stderr)
EOF

now_ns() { date +%s%N; }
# Appends "WHAT<TAB>seconds" to OUT/times.tsv for a step that ran (a skipped step keeps the
# line of the run that did it).
timed() { # WHAT COMMAND...
    local what="$1" t0
    shift
    t0=$(now_ns)
    "$@"
    printf '%s\t%s\n' "$what" "$(python3 -c "print(round(($(now_ns) - $t0) / 1e9, 1))")" >> "$OUT/times.tsv"
}

# 2. Teacher dumps (skipped when complete; the seconds of the first, real run are kept).
dump() { # NAME INPUT TEACHER-DUMP-ARGS...
    local name="$1" input="$2" dir="$OUT/dumps/$1"
    shift 2
    if [ -f "$dir/manifest.json" ] && [ -f "$dir.seconds" ]; then
        echo "study: $dir is complete" >&2
        return
    fi
    local t0
    t0=$(now_ns)
    timed "dump $name" "$BIN/teacher-dump" --teacher "$TEACHER" --input "$input" --out "$dir" \
        --max-new-tokens "$MAX_NEW" --batch-size 8 --rows-per-shard 64 --resume "${DEV[@]}" "$@"
    python3 -c "print(($(now_ns) - $t0) / 1e9)" > "$dir.seconds"
}
# The training rows' sampling: the sweep's dumps share it, so their rows are the training rows.
# shellcheck disable=SC2206
ROWS=("$OUT/prompts/train.jsonl" --sampling-temperature 1.0 --seed 0 $LIMIT_TRAIN)
TRAIN=("${ROWS[@]}" --responses-per-prompt "$SAMPLES")
dump train-k32 "${TRAIN[@]}" --targets top:32
# shellcheck disable=SC2086
dump heldout-k64 "$OUT/prompts/heldout.jsonl" --targets top:64 $LIMIT_HELD
HELD="$OUT/dumps/heldout-k64"
HELD_ROWS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['totals']['rows'])" "$HELD/manifest.json")

# Every run trains on POSITIONS distilled positions (student-fit's `positions`: the steps its
# batches need, the same batches for every method on the same shards). Held-out evaluations
# about 8 times per run, at steps of TOKEN_BUDGET tokens (padding counted) estimated from the
# dump's distilled positions per token.
TOKEN_BUDGET=2048
EVAL_EVERY=$(python3 - "$OUT/dumps/train-k32/manifest.json" "$POSITIONS" "$TOKEN_BUDGET" <<'EOF'
import json, math, sys
t = json.load(open(sys.argv[1]))["totals"]
per_step = int(sys.argv[3]) * t["positions"] / t["tokens"]
print(max(1, math.ceil(int(sys.argv[2]) / per_step / 8)))
EOF
)
BUDGET="positions = $POSITIONS"

# The students' layers, chosen once per shape on the training cache (no training: --steps 0;
# skipped when chosen already). The choice, with every candidate's score, is in
# OUT/layers/NAME/summary.json.
for s in "${STUDENTS[@]}"; do
    dir="$OUT/layers/$s"
    if [ ! -f "$dir/summary.json" ]; then
        timed "layers $s" "$BIN/student-fit" --shards "$OUT/dumps/train-k32" \
            --init-from-teacher "$TEACHER" --keep-layers "auto:${KEEP[$s]}" --steps 0 \
            --max-len 512 --out "$dir" "${DEV[@]}" > /dev/null
    fi
    LAYERS[$s]=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['teacher_layers'])" "$dir/summary.json")
    STUDENT_WORDS[$s]="${KEEP[$s]} of 30 layers, chosen on the cache (${LAYERS[$s]:1:-1})"
    echo "study: student $s keeps teacher layers ${LAYERS[$s]}" >&2
done

# 3. Training runs (skipped when finished, resumed when a checkpoint exists).
fit() { # NAME STUDENT SHARDS LOSS BUDGET [INIT] [EXTRA TOML LINE]
    local run="$OUT/runs/$1" p="$OUT/pipelines/$1.toml" init="${6:-}"
    [ -n "$init" ] || init="{ from_teacher = { path = \"$TEACHER\", keep_layers = ${LAYERS[$2]} } }"
    cat > "$p" <<EOF
description = "Study run $1"

[fit]
shards = "$3"
out = "$run"
init = $init
loss = $4
$5
token_budget = $TOKEN_BUDGET
max_len = 512
lr = 5e-4
min_lr = 5e-5
warmup_steps = 8
decay = "cosine"
max_grad_norm = 1.0
holdout_fraction = 0.0
eval_shards = "$HELD"
eval_every = $EVAL_EVERY
seed = 0
log_every = 8
checkpoint_every = 25
keep_checkpoints = 1
logits_chunk = 128
${7:-}
EOF
    if [ -f "$run/summary.json" ]; then
        echo "study: $run is complete" >&2
    else
        local resume=()
        [ -d "$run/checkpoints" ] && resume=(--resume)
        timed "train $1" "$BIN/student-fit" --pipeline "$p" "${resume[@]}" "${DEV[@]}"
    fi
    if [ -f "$OUT/evals/$1/eval.json" ] && [ "$OUT/evals/$1/eval.json" -nt "$run/summary.json" ]; then
        echo "study: $OUT/evals/$1 is complete" >&2
    else
        timed "eval $1" "$BIN/student-fit" eval --student "$run/student" --shards "$HELD" --max-len 512 \
            --generations "$HELD_ROWS" --max-new-tokens "$MAX_NEW" --out "$OUT/evals/$1" "${DEV[@]}" --json > /dev/null
    fi
}
FKL='{ divergence = { kind = "forward_kl" } }'
RKL='{ divergence = { kind = "reverse_kl" } }'
K32="$OUT/dumps/train-k32"
for s in "${STUDENTS[@]}"; do
    fit "$s-init" "$s" "$K32" "$FKL" "steps = 0"
    fit "$s-sft" "$s" "$K32" '{ divergence = { kind = "forward_kl" }, alpha = 0.0 }' "$BUDGET"
    fit "$s-forward_kl" "$s" "$K32" "$FKL" "$BUDGET"
    fit "$s-reverse_kl" "$s" "$K32" "$RKL" "$BUDGET"
    fit "$s-jsd" "$s" "$K32" '{ divergence = { kind = "jsd", beta = 0.5 } }' "$BUDGET"
    fit "$s-seed_recipe" "$s" "$K32" '{ divergence = { kind = "forward_kl" }, temperature = 2.0, alpha = 0.7 }' "$BUDGET"
    fit "$s-sft_then_reverse_kl" "$s" "$K32" "$RKL" "$BUDGET" "{ from_student = { path = \"$OUT/runs/$s-sft/student\" } }"
done
# The cache sweep, after the methods: the other caches of the same responses (the first
# SWEEP_SAMPLES of each prompt's; with fewer than SAMPLES the top-32 format-2 baseline is a
# dump and a run of its own, on the same rows as the others).
# The sweep's top-k caches are derived, without the teacher, from one format-1 top-1024 dump
# of those responses (`shard-cat derive`: each is, byte for byte, the dump its settings would
# write); their time is the derivation's. The sampled cache needs the teacher's whole
# distribution, so it stays a dump.
derive() { # NAME SHARD-CAT-DERIVE-ARGS...
    local name="$1" dir="$OUT/dumps/$1"
    shift
    if [ -f "$dir/manifest.json" ] && [ -f "$dir.seconds" ]; then
        echo "study: $dir is complete" >&2
        return
    fi
    rm -rf "$dir"
    local t0
    t0=$(now_ns)
    timed "derive $name" "$BIN/shard-cat" derive "$OUT/dumps/sweep-k1024-v1" --out "$dir" "$@"
    python3 -c "print(($(now_ns) - $t0) / 1e9)" > "$dir.seconds"
}
SWEEP=("${ROWS[@]}" --responses-per-prompt "$SWEEP_SAMPLES")
dump sweep-k1024-v1 "${SWEEP[@]}" --targets top:1024 --shard-format 1
SWEEP_K32=train-k32
SWEEP_K32_RUN=6l-forward_kl
if [ "$SWEEP_SAMPLES" != "$SAMPLES" ]; then
    SWEEP_K32=sweep-k32
    SWEEP_K32_RUN=6l-sweep-k32
    derive sweep-k32 --top-k 32 --shard-format 2
fi
derive train-k8 --top-k 8 --shard-format 2
derive train-k32-v1 --top-k 32
derive train-k1024 --shard-format 2
dump train-s12 "${SWEEP[@]}" --targets sample:12
[ "$SWEEP_K32_RUN" = 6l-forward_kl ] || fit "$SWEEP_K32_RUN" 6l "$OUT/dumps/$SWEEP_K32" "$FKL" "$BUDGET"
fit 6l-k8 6l "$OUT/dumps/train-k8" "$FKL" "$BUDGET"
fit 6l-k32-v1 6l "$OUT/dumps/train-k32-v1" "$FKL" "$BUDGET"
fit 6l-s12 6l "$OUT/dumps/train-s12" "$FKL" "$BUDGET" "" 'targets = "sampled"'
fit 6l-k1024 6l "$OUT/dumps/train-k1024" "$FKL" "$BUDGET"

# 4. The report.
# A dump's mean teacher mass outside its top-k, from shard-cat stats.
tail_mass() {
    "$BIN/shard-cat" --json stats "$OUT/dumps/$1" |
        python3 -c "import json,sys; print(f\"{json.load(sys.stdin)['mean_tail_mass']:.4f}\")"
}
cost() { # DUMP K SERIES LABEL RUN NOTE
    printf '    {"name": "%s", "k": %s, "tail": "bucket", "series": "%s", "label": "%s", "note": "%s", "dump": "dumps/%s", "dump_seconds": %s, "run": "runs/%s", "eval": "evals/%s"}' \
        "$1" "$2" "$3" "$4" "$6" "$1" "$(cat "$OUT/dumps/$1.seconds")" "$5" "$5"
}
methods() {
    local first=1 s name label run
    for s in "${STUDENTS[@]}"; do
        for name in init sft forward_kl reverse_kl jsd seed_recipe sft_then_reverse_kl; do
            case "$name" in
                init) label="initialisation (no training)" ;;
                sft) label="SFT on teacher responses (α = 0)" ;;
                forward_kl) label="forward KL" ;;
                reverse_kl) label="reverse KL" ;;
                jsd) label="JSD (β = 0.5)" ;;
                seed_recipe) label="forward KL, τ = 2, α = 0.7" ;;
                sft_then_reverse_kl) label="reverse KL from the SFT student" ;;
            esac
            run="\"runs/$s-$name\""
            [ "$name" = init ] && run=null
            [ $first = 1 ] || printf ',\n'
            first=0
            printf '    {"name": "%s", "label": "%s", "student": "%s", "run": %s, "eval": "evals/%s"}' \
                "$s-$name" "$label" "${STUDENT_WORDS[$s]}" "$run" "$s-$name"
        done
    done
    printf '\n'
}
MACHINE="$(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
cat > "$OUT/study.json" <<EOF
{
  "title": "Distilling SmolLM2-135M-Instruct into students of 6 and 15 layers",
  "machine": "$MACHINE",
  "command": "./pipelines/study.sh$ARGS",
  "methods": [
$(methods)
  ],
  "cost": [
$(cost train-k8 8 "top-k, format 2" "top-8 (format 2)" 6l-k8 "tail mass $(tail_mass train-k8); derived from the top-1024 dump"),
$(cost train-k32-v1 32 "top-k, format 1" "top-32 (format 1)" 6l-k32-v1 "tail mass $(tail_mass train-k32-v1); derived from the top-1024 dump"),
$(cost "$SWEEP_K32" 32 "top-k, format 2" "top-32 (format 2)" "$SWEEP_K32_RUN" "tail mass $(tail_mass "$SWEEP_K32")"),
$(cost train-k1024 1024 "top-k, format 2" "top-1024 (format 2, near-full reference)" 6l-k1024 "tail mass $(tail_mass train-k1024); derived from the format-1 dump"),
$(cost train-s12 12 "sample:12" "sample:12 (format 2, unbiased estimator)" 6l-s12 "12 draws per position")
  ]
}
EOF
timed report "$BIN/study-report" "$OUT" --max-prompts 1000   # every held-out prompt side by side

# 5. Publish: docs/study/ (its README.md kept) and that README's study block.
if [ "$PUBLISH" = 1 ]; then
    mkdir -p docs/study
    find docs/study -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
    cp "$OUT"/results/* "$OUT/times.tsv" docs/study/
    python3 - docs/study/results.md docs/study/README.md <<'EOF'
import re, sys
results, readme = sys.argv[1], sys.argv[2]
md = open(results, encoding="utf-8").read()
# The tables, plots and the machine line; the links stay relative to docs/study/, where the
# README that embeds them lives beside them.
body = re.sub(r"^# .*\n+", "", md)
text = open(readme, encoding="utf-8").read()
begin, end = "<!-- study:begin -->", "<!-- study:end -->"
if begin not in text or end not in text:
    sys.exit(f"{readme}: no {begin} ... {end} block to fill")
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
note = "<!-- written by pipelines/study.sh from docs/study/results.md; do not edit -->"
open(readme, "w", encoding="utf-8").write(f"{head}{begin}\n{note}\n\n{body.strip()}\n\n{end}{tail}")
print(f"study: {readme} study block rewritten from {results}", file=sys.stderr)
EOF
fi
