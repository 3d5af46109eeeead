#!/usr/bin/env bash
# Where a lift's CPU goes: one lift of the realistic sample disk (the one tests/bench.sh
# uses) on loopback, with `perf record --call-graph dwarf` on the edge and on the endpoint,
# each sample billed to the stage its stack names (tests/profile/stages.py), in CPU-s per
# GiB of the disk; beside it, what each stage costs alone on one core (stage-roofs).
#
# Usage (as root):  tests/profile.sh
#   BENCH_DIR=/tmp/gateway-bench   where the sample disk is cached (shared with bench.sh)
#   PROFILE_FREQ=499               samples per second per thread
#   PROFILE_KEEP=1                 keep the perf data and the run's folder
# Prints two tables and writes $BENCH_DIR/profile.json.
#
# The shares come from perf's samples; the CPU-s come from the processes' own counters
# (the edge's rusage, the endpoint's /proc/PID/stat across the lift), so perf's overhead
# and a busy machine move the seconds a little but the shares hardly.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
freq=${PROFILE_FREQ:-499}
log() { printf '[profile %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (perf on another process, drop_caches)"
need=()
command -v perf >/dev/null || need+=(linux-perf)
[ -x /usr/bin/time ] || need+=(time)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
perf record -q -o /dev/null -- true 2>/dev/null \
  || die "perf cannot record here (kernel.perf_event_paranoid=$(cat /proc/sys/kernel/perf_event_paranoid)); run as root on a kernel that allows perf events"

log "cargo build --release --workspace"
(cd "$root" && cargo build --release --workspace --quiet)
bin=$root/target/release
img=$(sample_disk 1G)
size=$(stat -c %s "$img")

tmp=$(mktemp -d "$BENCH_DIR/profile.XXXXXX")
ce_pid='' perf_pid=''
cleanup() {
  local rc=$?
  for pid in $perf_pid $ce_pid; do kill -INT "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  if [ "${PROFILE_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=4433
while [ -n "$(ss -Hlnu "sport = :$port")" ]; do port=$((port + 1)); done
"$bin/certs" quickstart --out "$tmp/pki" >/dev/null
mkdir -p "$tmp/vm"
ln -s "$img" "$tmp/vm/sample-disk.img"
write_vmx "$tmp/vm/profile.vmx" profile01 sample-disk.img 00:50:56:aa:bb:cc
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$port CLOUD_ENDPOINT_CERT=$tmp/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$tmp/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$tmp/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$tmp/datastore CLOUD_ENDPOINT_DATABASE=$tmp/inventory.db \
  CLOUD_ENDPOINT_LOG=warn CLOUD_ENDPOINT_API_LISTEN=off
"$bin/cloud-endpoint" serve >"$tmp/cloud-endpoint.log" 2>&1 &
ce_pid=$!
for _ in $(seq 100); do [ -n "$(ss -Hlnu "sport = :$port")" ] && break; sleep 0.1; done
kill -0 "$ce_pid" 2>/dev/null || { cat "$tmp/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
ce_ticks() { local s; s=$(</proc/"$ce_pid"/stat); s=${s##*) }; awk '{print $12 + $13}' <<<"$s"; }

# Cold cache, as a VM's disk is: the source's reads are part of the lift.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "cannot drop the page cache: the source is read warm"
perf record -q -F "$freq" --call-graph dwarf -o "$tmp/endpoint.data" -p "$ce_pid" 2>"$tmp/perf-endpoint.log" &
perf_pid=$!
sleep 0.5
t0=$(ce_ticks)
log "lifting $size bytes under perf ($freq Hz, DWARF stacks)"
# `time` inside perf: it counts the edge's CPU alone (user + system), not perf's.
# --no-dedup: a cloud that held this disk already would copy it instead of receiving it.
perf record -q -F "$freq" --call-graph dwarf -o "$tmp/edge.data" -- \
  /usr/bin/time -f '%U %S' -o "$tmp/edge.time" \
  "$bin/edge-agent" migrate --no-dedup --vmx "$tmp/vm/profile.vmx" --url "quic://127.0.0.1:$port" \
    --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
    --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --name profile-1 --json \
    >"$tmp/lift.json" 2>"$tmp/edge.log" || { tail -3 "$tmp/edge.log" >&2; die "the lift failed"; }
t1=$(ce_ticks)
kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=''
qemu-img compare "$img" "$tmp/datastore/profile-1/profile-1.vmdk" >/dev/null \
  || die "qemu-img compare: the lifted disk differs from the source"

edge_cpu=$(awk '{ printf "%.3f", $1 + $2 }' "$tmp/edge.time")
endpoint_cpu=$(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }')
log "CPU: edge $edge_cpu s, endpoint $endpoint_cpu s (of which perf's DWARF copies add a little)"
perf script -i "$tmp/edge.data" 2>/dev/null >"$tmp/edge.txt"
perf script -i "$tmp/endpoint.data" 2>/dev/null >"$tmp/endpoint.txt"
python3 "$root/tests/profile/stages.py" edge "$tmp/edge.txt" "$edge_cpu" "$size" >"$tmp/edge.json"
python3 "$root/tests/profile/stages.py" endpoint "$tmp/endpoint.txt" "$endpoint_cpu" "$size" >"$tmp/endpoint.json"
log "each stage alone on one core (stage-roofs)"
"$bin/stage-roofs" "$img" >"$tmp/roofs.json"

jq -n --slurpfile e "$tmp/edge.json" --slurpfile c "$tmp/endpoint.json" --slurpfile r "$tmp/roofs.json" \
  --slurpfile l <(tail -n1 "$tmp/lift.json") --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" \
  '{date: (now | todate), git: $rev, logical_bytes: $r[0].logical_bytes, lift: $l[0] | {duration_secs, payload_bytes, ratio},
    edge: $e[0], endpoint: $c[0], roofs: $r[0]}' >"$BENCH_DIR/profile.json"

table() { # side
  jq -r --arg s "$1" '.[$s] | "\n\($s): \(.cpu_s) CPU-s for \(.logical_gib * 100 | round / 100) GiB, \(.samples) samples\n"
    + "stage                                          | share  | CPU-s per GiB",
    (.stages[] | select(.share >= 0.005) | "\(.stage | .[0:46] | . + " " * (46 - length)) | \(.share * 1000 | round / 10 | tostring | . + "%" | " " * (6 - length) + .) | \(.cpu_s_per_gib * 100 | round / 100)")' \
    "$BENCH_DIR/profile.json"
}
table edge
table endpoint
echo
echo "each stage alone, one core (same image)                   | MB/s   | CPU-s per GiB"
jq -r '.roofs.stages[] | "\(.stage | .[0:56] | . + " " * (56 - length)) | \(.mb_per_s | round | tostring | " " * (6 - length) + .) | \(.cpu_s_per_gib * 100 | round / 100)"' "$BENCH_DIR/profile.json"
echo "results: $BENCH_DIR/profile.json"
