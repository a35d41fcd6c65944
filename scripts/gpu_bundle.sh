#!/usr/bin/env bash
# Builds what scripts/gpu_check.sh runs on a GPU machine that cannot build it (no network for
# crates.io, no nvcc): the cuda binaries, the GPU test binary and the random-teacher writer,
# linked against stub CUDA libraries (scripts/cuda_stubs.sh), xz-compressed into target/gpu-bundle/
# with SmolLM2's tokenizer. The bundle is under 64 MiB; the machine it runs on needs the
# NVIDIA driver and the CUDA 13 libraries (cuBLAS, cuRAND, NVRTC).
#
#   ./scripts/gpu_bundle.sh            # here, with nvcc from PyPI (as .ci/run installs it)
#   scripts/gpu_check.sh OUT_DIR       # there: finds target/gpu-bundle and uses it
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc > /dev/null; then
  cuda=$(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
  export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda"
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR=target/cuda
./scripts/cuda_stubs.sh target/cuda-stubs > /dev/null
export RUSTFLAGS="-L native=$PWD/target/cuda-stubs"
# One invocation, as CI's (one feature resolution for every target).
cargo build --release --workspace --features cuda --bins --tests --examples
rel=target/cuda/release
tests=$(ls -t "$rel"/deps/gpu-* | grep -v '\.d$' | head -1)
# The random-teacher writer needs no CUDA: the default build's is a tenth of the size.
[ -x target/release/examples/random_teacher ] ||
  env -u CARGO_TARGET_DIR -u RUSTFLAGS cargo build --release --workspace --bins --tests --examples
rm -rf target/gpu-bundle
mkdir -p target/gpu-bundle/bin target/gpu-bundle/tokenizer
for b in "$rel/teacher-dump" "$rel/student-fit" "$rel/shard-cat" target/release/examples/random_teacher "$tests"; do
  name=$(basename "$b")
  case $name in gpu-*) name=gpu-tests ;; esac
  strip -o "target/gpu-bundle/bin/$name" "$b"
  xz -9 -T0 "target/gpu-bundle/bin/$name"
done
# SmolLM2's tokenizer, read from the real teacher's GGUF (a random teacher of its shape is
# written on the GPU machine, whose disk the 98 MB GGUF would not reach in a bundle).
./scripts/setup.sh > /dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
./target/release/examples/random_teacher smollm2-135m "$tmp/t" \
  data/models/SmolLM2-135M-Instruct.Q4_1.gguf 2> /dev/null
cp "$tmp/t/tokenizer.json" "$tmp/t/tokenizer_config.json" target/gpu-bundle/tokenizer/
git rev-parse HEAD > target/gpu-bundle/commit 2> /dev/null || true
du -sh target/gpu-bundle
