#!/usr/bin/env bash
# Sets up (fetches the teacher), builds, and runs the quickstart dump on the bundled teacher and
# sample prompts, then shows what is inside the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The binaries, and in the same invocation the test targets: one feature resolution for both,
# so `cargo test --release --workspace` (the README's test command) compiles nothing again.
# Building the binaries alone resolves the dependencies' features without the
# dev-dependencies, and the test command would then compile ~50 crates (candle, arrow) anew.
cargo build --release --workspace --bins --tests --examples
rm -rf out/quickstart
./target/release/teacher-dump --pipeline pipelines/quickstart.toml
./target/release/shard-cat verify out/quickstart
./target/release/shard-cat stats out/quickstart
./target/release/shard-cat head out/quickstart -n 1 --positions 8
