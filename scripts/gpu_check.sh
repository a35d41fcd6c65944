#!/usr/bin/env bash
# The GPU check: one run on a machine with a CUDA device that writes every figure under the
# folder given (summary.json, the tools' --json summaries, the GPU tests' figures, sampled
# device memory, a log).
#
#   scripts/gpu_check.sh OUT_DIR
#
# It uses target/gpu-bundle/ when present (scripts/gpu_bundle.sh, built elsewhere), and
# otherwise builds with `cargo build --release --features cuda` here (nvcc on PATH). The
# teacher is data/models/SmolLM2-135M-Instruct.Q4_1.gguf when present, else a random-weight
# teacher of its shape with its tokenizer. Checks, each failing the script when it fails:
#   - the GPU tests (tests/gpu.rs): the teacher in f32 within 1e-3 nats of the CPU kernels
#     (bf16 and f16 reported), the reduction, one training step's gradients within 1e-4;
#   - 100 steps of pipelines/student-smollm2-6l.toml: held-out forward KL on the GPU within
#     1% of the CPU's.
# Figures: teacher-dump generated tokens/s at batch 64; student-fit distilled positions/s of
# the 6- and 15-layer students in f32 and bf16; peak device memory.
#
# A rehearsal where there is no GPU: KD_GPU_CHECK_DEVICE=cpu runs every step on the CPU
# instead (KD_GPU_ON_CPU=1 for the tests), KD_GPU_CHECK_STEPS shortens the training runs, and
# KD_GPU_CHECK_RANDOM_TEACHER=1 takes the random teacher even where the real one is.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
device=${KD_GPU_CHECK_DEVICE:-cuda}
steps=${KD_GPU_CHECK_STEPS:-100}
steps15=$((steps < 30 ? steps : 30))
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'kill "${smi:-0}" 2> /dev/null || true; rm -rf "$work"' EXIT
log() { echo "[$(date +%T) +$SECONDS s] $*" | tee -a "$out/log.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true
log "device: $(cat "$out/gpu.txt")"

if [ -d target/gpu-bundle ]; then
  bin=$work/bin
  mkdir -p "$bin"
  for f in target/gpu-bundle/bin/*.xz; do
    # xz where it is installed, Python's lzma otherwise.
    xz -dc "$f" > "$bin/$(basename "${f%.xz}")" 2> /dev/null ||
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
        "$f" > "$bin/$(basename "${f%.xz}")"
  done
  chmod +x "$bin"/*
  tests=$bin/gpu-tests
  random_teacher=$bin/random_teacher
  log "bundle of commit $(cat target/gpu-bundle/commit 2> /dev/null || echo unknown)"
else
  export CARGO_TARGET_DIR=target/cuda
  cargo build --release --workspace --features cuda --bins --tests --examples 2>&1 | tail -3
  bin=target/cuda/release
  tests=$(ls -t "$bin"/deps/gpu-* | grep -v '\.d$' | head -1)
  random_teacher=$bin/examples/random_teacher
  log "built"
fi

teacher=data/models/SmolLM2-135M-Instruct.Q4_1.gguf
tokenizer=target/gpu-bundle/tokenizer/tokenizer.json
if [ ! -f "$teacher" ] || [ "${KD_GPU_CHECK_RANDOM_TEACHER:-0}" = 1 ]; then
  teacher=$work/teacher
  "$random_teacher" smollm2-135m "$teacher" "$tokenizer" 2> /dev/null
fi
teacher=$(cd "$(dirname "$teacher")" && pwd)/$(basename "$teacher")
log "teacher: $teacher"

# Device memory in use, sampled every 200 ms for the whole check.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/memory-mib.txt" 2> /dev/null &
smi=$!

KD_REQUIRE_GPU=1 KD_GPU_OUT=$out KD_TEACHER_GGUF=$teacher KD_REPO_ROOT=$root \
  "$tests" --include-ignored --nocapture --test-threads 1 2>&1 | tee "$out/gpu-tests.txt"
log "GPU tests passed"

dump() {
  "$bin/teacher-dump" --pipeline pipelines/quickstart.toml --teacher "$teacher" --no-progress \
    --json "$@"
}
dump --device cpu --out "$work/qs-cpu" > "$out/dump-cpu.json"
log "CPU dump done"
dump --device "$device" --dtype bf16 --batch-size 64 --out "$work/qs-gpu" > "$out/dump-gpu-bf16.json"
dump --device "$device" --dtype f32 --batch-size 64 --out "$work/qs-gpu-f32" > "$out/dump-gpu-f32.json"
log "GPU dumps done"

fit() {
  "$bin/student-fit" --pipeline pipelines/student-smollm2-6l.toml --shards "$work/qs-cpu" \
    --init-from-teacher "$teacher" --json "$@"
}
six=0,6,12,18,24,29
fifteen=0,2,4,6,8,10,12,14,16,18,20,22,24,26,29
fit --keep-layers $six --steps "$steps" --device cpu --out "$work/s6-cpu" > "$out/fit6-cpu.json"
log "CPU student done"
fit --keep-layers $six --steps "$steps" --device "$device" --engine candle --out "$work/s6-f32" \
  > "$out/fit6-gpu-f32.json"
fit --keep-layers $six --steps "$steps" --device "$device" --precision bf16 --out "$work/s6-bf16" \
  > "$out/fit6-gpu-bf16.json"
fit --keep-layers $fifteen --steps "$steps15" --device "$device" --engine candle --out "$work/s15-f32" \
  > "$out/fit15-gpu-f32.json"
fit --keep-layers $fifteen --steps "$steps15" --device "$device" --precision bf16 --out "$work/s15-bf16" \
  > "$out/fit15-gpu-bf16.json"
log "GPU students done"
kill "$smi" 2> /dev/null || true

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def j(name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)
mem = [int(x) for x in open(os.path.join(out, "memory-mib.txt")).read().split() if x.isdigit()]
fit_cpu, fit_gpu = j("fit6-cpu.json"), j("fit6-gpu-f32.json")
kl_cpu, kl_gpu = fit_cpu["final_eval"]["forward_kl"], fit_gpu["final_eval"]["forward_kl"]
summary = {
    "teacher_dump_tokens_per_s": {n: j(f"dump-{n}.json")["tokens_per_s"] for n in ["cpu", "gpu-bf16", "gpu-f32"]},
    "student_positions_per_s": {n: j(f"fit{n}.json")["positions_per_s"]
                                for n in ["6-cpu", "6-gpu-f32", "6-gpu-bf16", "15-gpu-f32", "15-gpu-bf16"]},
    "student6_final_forward_kl": {"cpu": kl_cpu, "gpu_f32": kl_gpu,
                                  "gpu_bf16": j("fit6-gpu-bf16.json")["final_eval"]["forward_kl"]},
    "peak_device_memory_mib": max(mem) if mem else None,
}
for name in ["teacher", "training_step"]:
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        summary[name] = j(name + ".json")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
rel = abs(kl_gpu - kl_cpu) / kl_cpu
assert rel < 0.01, f"held-out forward KL on the GPU {kl_gpu} vs the CPU's {kl_cpu}: {rel:.2%} apart"
PY
log "GPU check passed: $out/summary.json"
