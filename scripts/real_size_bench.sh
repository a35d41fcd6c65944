#!/usr/bin/env bash
# Teachers at real sizes against the tools a user would pick instead, one run each, on the
# same prompts and threads: teacher-dump (bf16 safetensors; GGUF Q8_0 and Q4_K_M made from
# them), transformers (bf16, and f32 where it fits in memory) and llama.cpp (the same GGUF,
# with and without top-k log-probs). Random-weight teachers of real shapes, written by the
# kd-model examples, with real tokenizers (scripts/fetch_tokenizers.sh).
#
#   ./scripts/real_size_bench.sh [SHAPE ...]     # default: tinyllama-1.1b llama-3.1-8b
#
# FORMATS (default "bf16 q8_0 q4_k_m") picks the teacher formats to run.
#
# Shapes: tinyllama-1.1b (Llama 2 tokenizer: bf16 only, since the GGUF writer takes
# byte-level BPE tokenizers), llama-3.2-3b, llama-3.1-8b (Llama 3 tokenizer). Writes
# out/real/results.tsv: tool, format, file GB, load s, generated tokens/s, peak GB.
# Needs torch, transformers, pyarrow (and llama-cpp-python for its rows); about 40 GB of
# disk for the 8B shape.
set -euo pipefail
cd "$(dirname "$0")/.."
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(tinyllama-1.1b llama-3.1-8b)
threads=${THREADS:-2}
new=${NEW_TOKENS:-32}
formats=" ${FORMATS:-bf16 q8_0 q4_k_m} "
out=out/real
mkdir -p "$out"
./scripts/fetch_tokenizers.sh > /dev/null
# The quickstart's build (the same features, so nothing is compiled twice).
cargo build --release --workspace --bins --tests --examples
head -8 data/prompts/quickstart.jsonl > "$out/prompts8.jsonl"
results=$out/results.tsv
[ -f "$results" ] || printf 'shape\ttool\tformat\tfile_gb\tload_s\ttokens_per_s\tpeak_gb\n' > "$results"
mem_gb=$(awk '/MemTotal/ {print $2 / 1e6}' /proc/meminfo)

size_gb() { du -sb "$1" | awk '{printf "%.2f", $1 / 1e9}'; }

# teacher-dump: load s = wall − the dump's own seconds; peak from /usr/bin/time.
dump() { # shape, teacher path, format label [tool label, extra teacher-dump arguments...]
  local d=$out/dump-$1-$3 tool=${4:-teacher-dump}
  local extra=("${@:5}")
  rm -rf "$d"
  /usr/bin/time -v ./target/release/teacher-dump --teacher "$2" --input "$out/prompts8.jsonl" \
    --out "$d" --top-k 32 --max-new-tokens "$new" --batch-size 8 --threads "$threads" \
    --no-chat-template --no-progress --json "${extra[@]}" > "$d.json" 2> "$d.time"
  python3 - "$1" "$3" "$(size_gb "$2")" "$d.json" "$d.time" "$tool" >> "$results" <<'PY'
import json, re, sys
shape, fmt, size, js, tm, tool = sys.argv[1:]
s = json.load(open(js))
t = open(tm).read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", t)
h, m, sec = wall.groups()
wall = int(h or 0) * 3600 + int(m) * 60 + float(sec)
peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1e6
print(f"{shape}\t{tool}\t{fmt}\t{size}\t{wall - s['seconds']:.1f}\t{s['tokens_per_s']:.2f}\t{peak:.2f}")
PY
}

baseline() { # shape, script, model, format label, file, args...
  local shape=$1 script=$2 model=$3 fmt=$4 file=$5
  shift 5
  python3 "$script" --model "$model" --shards "$out/dump-$shape-bf16" --threads "$threads" \
    --max-new-tokens "$new" "$@" 2> /dev/null | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("\t".join([sys.argv[1], r["tool"], sys.argv[2], sys.argv[3], str(r["load_s"]), str(r["tokens_per_s"]), str(r["peak_rss_gb"])]))
' "$shape" "$fmt" "$(size_gb "$file")" >> "$results"
}

for shape in "${shapes[@]}"; do
  case $shape in
    tinyllama-1.1b) tok=data/tokenizers/llama2/tokenizer.json; gguf=no ;;
    *) tok=data/tokenizers/llama3/tokenizer.json; gguf=yes ;;
  esac
  hf=$out/$shape-bf16
  [ -f "$hf/model.safetensors" ] || ./target/release/examples/random_teacher "$shape" "$hf" "$tok"
  if [[ $formats == *" bf16 "* ]]; then
    dump "$shape" "$hf" bf16
    # The same weights multiplied straight from the mapped file (AMX only; packed elsewhere).
    dump "$shape" "$hf" bf16-in-place "teacher-dump --weights-in-place" --weights-in-place
    baseline "$shape" scripts/transformers_dump_baseline.py "$hf" bf16 "$hf" --dtype bfloat16 --top-k 32
    # f32 holds 4 bytes per parameter: only where that leaves room.
    if awk -v s="$(size_gb "$hf")" -v m="$mem_gb" 'BEGIN {exit !(2 * s < 0.8 * m)}'; then
      baseline "$shape" scripts/transformers_dump_baseline.py "$hf" f32 "$hf" --dtype float32 --top-k 32
    fi
  fi
  if [ $gguf = yes ]; then
    for q in q8_0 q4_k_m; do
      [[ $formats == *" $q "* ]] || continue
      g=$out/$shape-$q.gguf
      [ -f "$g" ] || ./target/release/examples/hf_to_gguf "$hf" "$g" "$q"
      dump "$shape" "$g" "$q"
      if python3 -c 'import llama_cpp' 2> /dev/null; then
        baseline "$shape" scripts/llama_cpp_dump_baseline.py "$g" "$q" "$g" --top-k 32
        baseline "$shape" scripts/llama_cpp_dump_baseline.py "$g" "$q" "$g"
      fi
    done
  fi
done
column -t -s $'\t' "$results"
