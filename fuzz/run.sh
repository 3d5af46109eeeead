#!/usr/bin/env bash
# Runs every fuzz target for a short while (CI) or as long as asked:
#   fuzz/run.sh [SECONDS_PER_TARGET]        default 20
# Needs cargo-fuzz (`cargo install cargo-fuzz`); works on stable with `-s none`.
# A crash is saved under fuzz/artifacts/<target>/; copy it into
# fuzz/regressions/<target>/ so `cargo test` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
targets=$(cargo fuzz list --fuzz-dir fuzz)
cargo fuzz build -s none --fuzz-dir fuzz
for t in $targets; do
  corpus=$(mktemp -d)
  echo "== fuzz $t for ${secs}s"
  cargo fuzz run -s none --fuzz-dir fuzz "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 2>&1 \
    | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)' || true
  rm -rf "$corpus"
  if ls "fuzz/artifacts/$t"/crash-* "fuzz/artifacts/$t"/oom-* "fuzz/artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "fuzz target $t found a failing input: see fuzz/artifacts/$t/" >&2
    exit 1
  fi
done
