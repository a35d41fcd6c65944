#!/usr/bin/env bash
# The distillation study: what each method buys, and what the cache costs.
#
#   ./pipelines/study.sh            # the full study, about an hour on 2 CPU cores
#   ./pipelines/study.sh --quick    # a few minutes: 16 train / 6 held-out prompts, 4 steps
#
# Flags: --out DIR (default out/study), --steps N (optimizer steps per run, default 64, of
# about 300 distilled positions each), --eval-every N (default 16), --max-new-tokens N (teacher
# and student responses, default 128), --heldout FILE (held-out prompts from a JSONL file of
# your own; the training prompts are then every seed task whose id is not in it; implies
# --no-publish), --quick, --no-publish.
#
# A full run with the default --out also publishes: it copies OUT/results/ to docs/study/ and
# rewrites the study block of README.md from it (between the `study:begin` and `study:end`
# markers), so the README shows exactly what the study wrote.
#
# 1. Splits the 175 self-instruct seed tasks by a hash of their id into training prompts
#    (~80%) and held-out prompts (the rest): no prompt is in both. With --heldout FILE the
#    held-out prompts are FILE's, and the training prompts the seed tasks not in it (by id).
# 2. Dumps SmolLM2-135M-Instruct's greedy responses to the training prompts at top-k 8, 32
#    and 64 (timed), and to the held-out prompts at top-k 64.
# 3. Trains the same 6-layer student (teacher layers 0,6,12,18,24,29) with the same steps,
#    batches and learning-rate schedule under: SFT on the teacher's responses (α = 0),
#    forward KL, reverse KL, JSD(0.5) and the seed recipe (forward KL, τ = 2, α = 0.7), all
#    from the top-32 shards; and forward KL from k = 8, 32, 64 with the bucket and the renorm
#    tail policies.
# 4. Evaluates the untrained initialisation and every student on the held-out shards (top-64,
#    bucket tail), with greedy generations, and writes OUT/results/ with study-report.
#
# Every step is skipped when its output is already complete, so an interrupted study
# continues where it stopped (a training run resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS=""
for a in "$@"; do ARGS="$ARGS $a"; done
OUT=out/study
STEPS=64
EVAL_EVERY=16
MAX_NEW=128
LIMIT_TRAIN=""
LIMIT_HELD=""
GENS=6
PUBLISH=1
HELDOUT_FILE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; PUBLISH=0; shift 2 ;;
        --no-publish) PUBLISH=0; shift ;;
        --heldout) HELDOUT_FILE="$2"; PUBLISH=0; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --eval-every) EVAL_EVERY="$2"; shift 2 ;;
        --max-new-tokens) MAX_NEW="$2"; shift 2 ;;
        --quick) PUBLISH=0; STEPS=4; EVAL_EVERY=2; MAX_NEW=24; LIMIT_TRAIN="--limit 16"; LIMIT_HELD="--limit 6"; GENS=2; shift ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "study.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

TEACHER=data/models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPTS=data/prompts/self-instruct-seed-tasks.jsonl
LAYERS="[0, 6, 12, 18, 24, 29]"
BIN=target/release

[ -f "$TEACHER" ] || ./scripts/setup.sh
cargo build --release --workspace --bins --tests --examples   # as scripts/quickstart.sh: one build
mkdir -p "$OUT/prompts" "$OUT/dumps" "$OUT/runs" "$OUT/evals" "$OUT/pipelines"

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

# 2. Teacher dumps (skipped when complete; the seconds of the first, real run are kept).
dump() { # NAME INPUT K LIMIT
    local dir="$OUT/dumps/$1"
    if [ -f "$dir/manifest.json" ] && [ -f "$dir.seconds" ]; then
        echo "study: $dir is complete" >&2
        return
    fi
    local t0
    t0=$(now_ns)
    # shellcheck disable=SC2086
    "$BIN/teacher-dump" --teacher "$TEACHER" --input "$2" --out "$dir" --top-k "$3" \
        --max-new-tokens "$MAX_NEW" --batch-size 8 --rows-per-shard 64 --resume $4
    python3 -c "print(($(now_ns) - $t0) / 1e9)" > "$dir.seconds"
}
for k in 8 32 64; do
    dump "train-k$k" "$OUT/prompts/train.jsonl" "$k" "$LIMIT_TRAIN"
done
dump heldout-k64 "$OUT/prompts/heldout.jsonl" 64 "$LIMIT_HELD"
HELD="$OUT/dumps/heldout-k64"

# 3. Training runs (skipped when finished, resumed when a checkpoint exists).
fit() { # NAME SHARDS LOSS STEPS
    local run="$OUT/runs/$1" p="$OUT/pipelines/$1.toml"
    cat > "$p" <<EOF
description = "Study run $1"

[fit]
shards = "$2"
out = "$run"
init = { from_teacher = { path = "$TEACHER", keep_layers = $LAYERS } }
loss = $3
steps = $4
token_budget = 1024
max_len = 512
lr = 5e-4
min_lr = 5e-5
warmup_steps = 4
decay = "cosine"
max_grad_norm = 1.0
holdout_fraction = 0.0
eval_shards = "$HELD"
eval_every = $EVAL_EVERY
seed = 0
log_every = 4
checkpoint_every = 16
keep_checkpoints = 1
logits_chunk = 128
EOF
    if [ -f "$run/summary.json" ]; then
        echo "study: $run is complete" >&2
    else
        local resume=""
        [ -d "$run/checkpoints" ] && resume="--resume"
        "$BIN/student-fit" --pipeline "$p" $resume
    fi
    if [ -f "$OUT/evals/$1/eval.json" ] && [ "$OUT/evals/$1/eval.json" -nt "$run/summary.json" ]; then
        echo "study: $OUT/evals/$1 is complete" >&2
    else
        "$BIN/student-fit" eval --student "$run/student" --shards "$HELD" --max-len 512 \
            --generations "$GENS" --max-new-tokens "$MAX_NEW" --out "$OUT/evals/$1" --json > /dev/null
    fi
}
FKL='{ divergence = { kind = "forward_kl" } }'
fit init "$OUT/dumps/train-k32" "$FKL" 0
fit sft "$OUT/dumps/train-k32" '{ divergence = { kind = "forward_kl" }, alpha = 0.0 }' "$STEPS"
fit forward_kl "$OUT/dumps/train-k32" "$FKL" "$STEPS"
fit reverse_kl "$OUT/dumps/train-k32" '{ divergence = { kind = "reverse_kl" } }' "$STEPS"
fit jsd "$OUT/dumps/train-k32" '{ divergence = { kind = "jsd", beta = 0.5 } }' "$STEPS"
fit seed_recipe "$OUT/dumps/train-k32" '{ divergence = { kind = "forward_kl" }, temperature = 2.0, alpha = 0.7 }' "$STEPS"
for k in 8 64; do
    fit "fkl-k$k-bucket" "$OUT/dumps/train-k$k" "$FKL" "$STEPS"
done
for k in 8 32 64; do
    fit "fkl-k$k-renorm" "$OUT/dumps/train-k$k" '{ divergence = { kind = "forward_kl" }, tail = "renorm" }' "$STEPS"
done

# 4. The report.
secs() { cat "$OUT/dumps/train-k$1.seconds"; }
cost() { # K TAIL RUN
    echo "    {\"k\": $1, \"tail\": \"$2\", \"dump\": \"dumps/train-k$1\", \"dump_seconds\": $(secs "$1"), \"run\": \"runs/$3\", \"eval\": \"evals/$3\"}"
}
MACHINE="$(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
cat > "$OUT/study.json" <<EOF
{
  "title": "Distilling SmolLM2-135M-Instruct into a 6-layer student",
  "machine": "$MACHINE",
  "command": "./pipelines/study.sh$ARGS",
  "methods": [
    {"name": "init", "label": "initialisation (no training)", "run": null, "eval": "evals/init"},
    {"name": "sft", "label": "SFT on teacher responses (α = 0)", "run": "runs/sft", "eval": "evals/sft"},
    {"name": "forward_kl", "label": "forward KL", "run": "runs/forward_kl", "eval": "evals/forward_kl"},
    {"name": "reverse_kl", "label": "reverse KL", "run": "runs/reverse_kl", "eval": "evals/reverse_kl"},
    {"name": "jsd", "label": "JSD (β = 0.5)", "run": "runs/jsd", "eval": "evals/jsd"},
    {"name": "seed_recipe", "label": "forward KL, τ = 2, α = 0.7", "run": "runs/seed_recipe", "eval": "evals/seed_recipe"}
  ],
  "cost": [
$(cost 8 bucket fkl-k8-bucket),
$(cost 32 bucket forward_kl),
$(cost 64 bucket fkl-k64-bucket),
$(cost 8 renorm fkl-k8-renorm),
$(cost 32 renorm fkl-k32-renorm),
$(cost 64 renorm fkl-k64-renorm)
  ]
}
EOF
"$BIN/study-report" "$OUT"

# 5. Publish: docs/study/ and the README's study block.
if [ "$PUBLISH" = 1 ]; then
    mkdir -p docs/study
    cp "$OUT"/results/* docs/study/
    python3 - docs/study/results.md README.md <<'EOF'
import re, sys
results, readme = sys.argv[1], sys.argv[2]
md = open(results, encoding="utf-8").read()
# The tables and the machine line, with links pointing into docs/study/.
body = re.sub(r"^# .*\n+", "", md)
body = re.sub(r"\]\(([\w.-]+\.(?:png|md))\)", r"](docs/study/\1)", body)
body = body.replace("## Cost of the teacher cache", "#### Cost of the teacher cache")
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
