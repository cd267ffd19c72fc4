#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each. Installs cargo-fuzz if
# needed. cargo-fuzz needs nightly features; on the stable toolchain we enable
# them with RUSTC_BOOTSTRAP=1 (fuzzing only: the product builds on stable).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cd fuzz
for t in $(cargo fuzz list); do
  mkdir -p "corpus/$t"
  seed="corpus_seed/$t"
  echo "== fuzzing $t for ${secs}s"
  if [ -d "$seed" ]; then
    cargo fuzz run "$t" "corpus/$t" "$seed" -- -max_total_time="$secs" -rss_limit_mb=4096
  else
    cargo fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096
  fi
done
