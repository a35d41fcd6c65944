#!/usr/bin/env bash
# Sets up (fetches the teacher), builds, and runs the quickstart dump on the bundled teacher and
# sample prompts, then shows what is inside the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --bins
rm -rf out/quickstart
./target/release/teacher-dump --pipeline pipelines/quickstart.toml
./target/release/shard-cat verify out/quickstart
./target/release/shard-cat stats out/quickstart
./target/release/shard-cat head out/quickstart -n 1 --positions 8
