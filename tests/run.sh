#!/usr/bin/env bash
# The workspace's tests, as the README gives them: installs what the tests need
# (tests/setup.sh), builds, then runs every test. Arguments go to nextest, e.g.
# `tests/run.sh -p e2e logins::`.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/setup.sh
# The test executables, then the binaries the end-to-end tests spawn from
# target/release, so the binaries are the newer ones and the WAN test uses them as they
# are instead of rebuilding them. The arguments (filters, --no-fail-fast, ...) are for
# the run only: the build is the same whatever runs.
cargo nextest run --release --workspace --no-run
cargo build --release --workspace
# A machine without Docker may leave the container tests out, never silently: the run's
# last line says they were not run. CI never sets GATEWAY_SKIP_CONTAINERS (.ci/run).
if [ "${GATEWAY_SKIP_CONTAINERS:-}" = 1 ]; then
  status=0
  cargo nextest run --release --workspace -E 'not test(/^containers::/)' "$@" || status=$?
  echo "tests/run.sh: SKIPPED the container tests (tests/tests/containers.rs): GATEWAY_SKIP_CONTAINERS=1; they need a Docker engine and docker-compose" >&2
  exit "$status"
fi
cargo nextest run --release --workspace "$@"
