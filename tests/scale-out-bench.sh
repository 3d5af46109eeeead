#!/usr/bin/env bash
# Scale-out benchmark (issue 18): several cloud endpoint processes on one PostgreSQL
# inventory and one datastore folder. Not a timed test: it reports, it does not judge.
#
# Usage (from anywhere; as root it installs what is missing):   tests/scale-out-bench.sh
#   SCALE_BENCH_VMS=12          part 1: VMs lifted per phase
#   SCALE_BENCH_VM_MIB=32       each VM's raw disk (half random, a quarter text, a quarter zero)
#   SCALE_BENCH_EDGES=4         concurrent edge-agent migrate processes
#   SCALE_BENCH_ENDPOINTS=1,2,3 endpoint counts on PostgreSQL (plus 1 on SQLite, the baseline)
#   SCALE_BENCH_OPS_THREADS=4   part 2: threads calling the inventory at once
#   SCALE_BENCH_OPS_SECS=3      part 2: seconds of each kind of operation
#   SCALE_BENCH_FAILOVER_MIB=48 part 3: the lift whose endpoint is killed at ~30 %
#   SCALE_BENCH_FAILOVER_RATE=64mbit
#   SCALE_BENCH_FAILOVER=10:30,10:3,3:3   lease period:idle timeout (s) pairs, one failover each
#   SCALE_BENCH_PARTS=lifts,ops,failover
#   SCALE_BENCH_DIR=/tmp/gateway-scale-out-bench   run folder (removed after) and results.json
#
# 1. Lifts: the VMs by the edges at once, through 1 endpoint on SQLite, then 1, 2 and 3 on
#    PostgreSQL; each edge names every endpoint (--url), rotated per VM, so lifts spread.
#    Wall time, migrations/min, MB/s, CPU seconds of endpoints, edges and PostgreSQL (/proc),
#    cores busy against nproc. Every copy is checked with qemu-img compare.
# 2. Inventory operations per second through the library: reads (list VMs, list
#    migrations), begin + fail of a migration, a renewal round of 50 leases; SQLite,
#    PostgreSQL as in service (fsync on) and as the tests run it (fsync off); errors and
#    PostgreSQL's rolled-back transactions (lost serialization races, run again).
# 3. Failover: two endpoints, one lift through --url A,B at a capped rate, A killed with
#    SIGKILL at ~30 %; seconds from the kill until the edge noticed (idle timeout), A's
#    lease expired, B logged "migration resumed", and the edge's progress moved on.
#    Target: under 2x the lease period.
# The binary is tests/src/bin/scale-out-bench.rs; docs/scale-out.md#benchmark has figures.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[scale-out-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

need_pkgs=()
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "install ${need_pkgs[*]} (or run as root, which installs them)"
  log "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

log "cargo build --release --workspace"
(cd "$root" && cargo build --release --workspace --quiet)
log "nproc: $(nproc); load average: $(cut -d" " -f1-3 /proc/loadavg)"
exec "$root/target/release/scale-out-bench"
