#!/usr/bin/env bash
# Writes stub shared libraries for the CUDA libraries a `--features cuda` build links
# (libcuda, libnvrtc, libcurand, libcublas, libcublasLt) into the folder given, so that the
# cuda build links on a machine without a GPU driver or those libraries, as CI's does. The CUDA
# runtime, which candle's kernels link, is the real one: libcudart.so.13 of $CUDA_ROOT/lib
# (nvidia-cuda-runtime from PyPI ships it without the unversioned name the linker asks for, so
# that name is linked to it here).
#
# candle 0.11 has cudarc link them dynamically. Each stub defines every function cudarc
# declares for its library (read from cudarc's own source) and carries the real library's
# soname, so a binary linked against the stubs loads the real libraries where they are
# installed. Loaded instead (on a machine without a GPU, with the folder on LD_LIBRARY_PATH:
# each stub is also there under its soname),
# every stub function returns 100, CUDA_ERROR_NO_DEVICE: `--device cuda` then says that no
# device answers, and the CPU paths run.
#
#   ./scripts/cuda_stubs.sh target/cuda-stubs
#   RUSTFLAGS="-L native=target/cuda-stubs" cargo build --release --features cuda
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/cuda_stubs.sh OUT_DIR}
mkdir -p "$out"
cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, os, sys
pkgs = json.load(sys.stdin)["packages"]
print(next(os.path.dirname(p["manifest_path"]) for p in pkgs if p["name"] == "cudarc"))')
# library, soname, cudarc module
while read -r lib soname module; do
  src="$cudarc/src/$module/sys/mod.rs"
  c="$out/$lib.c"
  grep -ohE '^\s+fn [A-Za-z_][A-Za-z0-9_]*\(' "$src" | sed -E 's/^\s+fn ([A-Za-z0-9_]+)\(/\1/' \
    | sort -u | sed 's/.*/int &(void) { return 100; }/' > "$c"
  test -s "$c" || { echo "no functions found in $src" >&2; exit 1; }
  cc -shared -fPIC -Wl,-soname,"$soname" -o "$out/$lib.so" "$c"
  ln -sf "$lib.so" "$out/$soname"
  echo "$out/$lib.so ($soname): $(wc -l < "$c") functions"
done <<'LIBS'
libcuda libcuda.so.1 driver
libnvrtc libnvrtc.so.13 nvrtc
libcurand libcurand.so.10 curand
libcublas libcublas.so.13 cublas
libcublasLt libcublasLt.so.13 cublaslt
LIBS
if [ -n "${CUDA_ROOT:-}" ] && [ -f "$CUDA_ROOT/lib/libcudart.so.13" ]; then
  ln -sf "$CUDA_ROOT/lib/libcudart.so.13" "$out/libcudart.so"
  ln -sf "$CUDA_ROOT/lib/libcudart.so.13" "$out/libcudart.so.13"
  echo "$out/libcudart.so -> $CUDA_ROOT/lib/libcudart.so.13"
fi
