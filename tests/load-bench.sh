#!/usr/bin/env bash
# Load benchmark: one cloud-endpoint process takes LOAD_N concurrent `edge-agent migrate`
# processes (4 edge certificates in turn), all started together on distinct VMs, and,
# in the same run, one single migration of a VM of the same total size, as a user would
# compare "many at once" with "one big one".
#
# Usage (from anywhere; root not needed):   tests/load-bench.sh
#   LOAD_N=32          concurrent migrations (the endpoint's default limit is 32)
#   LOAD_SIZE=64M      disk size of each VM: a quarter random, a quarter repeated text,
#                      half zero (a hole), so zstd and zero detection both run
#   LOAD_DIR=/tmp/gateway-load-bench   where VMs, datastore and results.json go
#   LOAD_KEEP=1        keep the run's folder (logs, datastore) for inspection
#
# Reported: wall time from the start of the first edge to the end of the last, logical
# rate (disk bytes / wall), wire rate (the edges' UDP payload bytes / wall), the
# endpoint's peak RSS (VmHWM, read at the end of each phase; the endpoint is restarted for
# the endpoint is restarted for each phase), its CPU seconds, the peak RSS of each
# edge-agent (GNU time; max and median). Every disk is checked with qemu-img compare.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
LOAD_N=${LOAD_N:-32}
LOAD_SIZE=${LOAD_SIZE:-64M}
LOAD_DIR=${LOAD_DIR:-/tmp/gateway-load-bench}
log() { printf '[load-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[[ $LOAD_N =~ ^[1-9][0-9]*$ ]] || die "LOAD_N=$LOAD_N is not a positive number"
[[ $LOAD_SIZE =~ ^[0-9]+[KMG]$ ]] || die "LOAD_SIZE=$LOAD_SIZE is not like 64M"
size=$(numfmt --from=iec "$LOAD_SIZE")
[ $((size % (4 << 20))) = 0 ] || die "LOAD_SIZE must be a multiple of 4M"
for tool in jq qemu-img /usr/bin/time ss; do command -v "$tool" >/dev/null || die "$tool is needed"; done

log "cargo build --release --workspace"
(cd "$root" && cargo build --release --workspace --quiet)
bin=$root/target/release

mkdir -p "$LOAD_DIR"
tmp=$(mktemp -d "$LOAD_DIR/run.XXXXXX")
ce_pid=''
cleanup() {
  local rc=$?
  [ -n "$ce_pid" ] && kill -TERM "$ce_pid" 2>/dev/null && wait "$ce_pid" 2>/dev/null || true
  if [ "${LOAD_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- VMs ----------------------------------------------------------------------------
# make_disk FILE BYTES SEED: random quarter, repeated-text quarter (with the seed in it,
# so no two disks are alike), then a hole for the zero half.
make_disk() {
  local q=$(($2 / 4))
  { head -c "$q" /dev/urandom
    # yes ends on SIGPIPE when head has enough; that is not a failure here.
    { yes "legacy VM $3: /var/log/app.log 2026-11-26 request served in 12 ms, status 200 OK" || true; } | head -c "$q"
  } >"$1"
  truncate -s "$2" "$1"
}
# make_vm DIR NAME BYTES SEED
make_vm() {
  mkdir -p "$1"
  make_disk "$1/$2.img" "$3" "$4"
  write_vmx "$1/$2.vmx" "$2" "$2.img"
}
log "making $LOAD_N VMs of $LOAD_SIZE and one of $LOAD_N x $LOAD_SIZE"
for i in $(seq -w 1 "$LOAD_N"); do make_vm "$tmp/vms/load$i" "load$i" "$size" "$i"; done
make_vm "$tmp/vms/single" single $((size * LOAD_N)) single

# --- PKI, endpoint ------------------------------------------------------------------
"$bin/certs" quickstart --out "$tmp/pki" >/dev/null
for e in 1 2 3 4; do
  "$bin/certs" edge --ca "$tmp/pki" --out "$tmp/pki" --name "edge-dc$e" --stem "edge$e" >/dev/null
done
port=4433
while [ -n "$(ss -Hlnu "sport = :$port")" ]; do port=$((port + 1)); done
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$port CLOUD_ENDPOINT_CERT=$tmp/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$tmp/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$tmp/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$tmp/datastore CLOUD_ENDPOINT_DATABASE=$tmp/inventory.db \
  CLOUD_ENDPOINT_LOG=${CLOUD_ENDPOINT_LOG:-warn} CLOUD_ENDPOINT_API_LISTEN=off
# A fresh endpoint process per phase (same datastore and inventory), so each phase's peak
# RSS is its own and not what the allocator kept from the one before.
start_ce() {
  "$bin/cloud-endpoint" serve >>"$tmp/cloud-endpoint.log" 2>&1 &
  ce_pid=$!
  for _ in $(seq 100); do [ -n "$(ss -Hlnu "sport = :$port")" ] && break; sleep 0.1; done
  kill -0 "$ce_pid" 2>/dev/null || { cat "$tmp/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
}
stop_ce() { kill -TERM "$ce_pid"; wait "$ce_pid" || true; ce_pid=''; }
ce_kib() { awk -v k="$1:" '$1 == k {print $2}' /proc/"$ce_pid"/status; }
# utime+stime of all threads, fields 14 and 15 of stat (after the command name's ")").
ce_ticks() { local s; s=$(</proc/"$ce_pid"/stat); s=${s##*) }; awk '{print $12 + $13}' <<<"$s"; }
now() { date +%s.%N; }

# lift NAME EDGE: one edge-agent under GNU time (wall, peak RSS), JSON lines kept.
lift() {
  /usr/bin/time -f '%e %M %U %S' -o "$tmp/$1.time" \
    "$bin/edge-agent" migrate --vmx "$tmp/vms/$1/$1.vmx" --url "quic://127.0.0.1:$port" \
      --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
      --cert "$tmp/pki/edge$2.pem" --key "$tmp/pki/edge$2.key" --json \
      --receipt "$tmp/$1.receipt.json" >"$tmp/$1.json" 2>"$tmp/$1.log"
}

# --- phase 1: LOAD_N at once --------------------------------------------------------
sync
start_ce; t0=$(ce_ticks); start=$(now)
log "phase 1: $LOAD_N concurrent migrations to quic://127.0.0.1:$port"
pids=()
n=0
for i in $(seq -w 1 "$LOAD_N"); do lift "load$i" $((n % 4 + 1)) & pids+=($!); n=$((n + 1)); done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
end=$(now); t1=$(ce_ticks)
conc_hwm=$(ce_kib VmHWM)
conc_cpu=$(( t1 - t0 ))
stop_ce
[ "$failed" = 0 ] || { tail -n2 "$tmp"/load*.json | tail -20 >&2; die "$failed of $LOAD_N migrations failed"; }
conc_wall=$(jq -n "$end - $start")

# --- phase 2: one VM of the same total size -----------------------------------------
sync
start_ce; t0=$(ce_ticks); start=$(now)
log "phase 2: one migration of $((size * LOAD_N)) bytes"
lift single 1 || { tail -n3 "$tmp/single.json" "$tmp/single.log" >&2; die "the single migration failed"; }
end=$(now); t1=$(ce_ticks)
single_hwm=$(ce_kib VmHWM)
single_cpu=$(( t1 - t0 ))
stop_ce
single_wall=$(jq -n "$end - $start")

# --- correctness --------------------------------------------------------------------
log "qemu-img compare of every disk"
for i in $(seq -w 1 "$LOAD_N") single; do
  name=load$i; [ "$i" = single ] && name=single
  qemu-img compare "$tmp/vms/$name/$name.img" "$tmp/datastore/$name/$name.vmdk" >/dev/null 2>&1 \
    || die "qemu-img compare: $name differs from its source"
done
registered=$("$bin/cloud-endpoint" inventory 2>/dev/null | grep -c '^vm-' || true)

# --- results ------------------------------------------------------------------------
clk_tck=$(getconf CLK_TCK)
for i in $(seq -w 1 "$LOAD_N"); do tail -n1 "$tmp/load$i.json"; done >"$tmp/conc.jsonl"
for i in $(seq -w 1 "$LOAD_N"); do cat "$tmp/load$i.time"; done | awk '{print $2}' >"$tmp/conc-rss.txt"
read -r _ single_edge_rss su ss <"$tmp/single.time"
single_edge_cpu=$(jq -n "$su + $ss")
conc_edge_cpu=$(for i in $(seq -w 1 "$LOAD_N"); do cat "$tmp/load$i.time"; done | awk '{t += $3 + $4} END {print t}')
jq -n --slurpfile c "$tmp/conc.jsonl" --slurpfile s <(tail -n1 "$tmp/single.json") \
  --rawfile rss "$tmp/conc-rss.txt" --argjson n "$LOAD_N" --argjson size "$size" \
  --argjson cw "$conc_wall" --argjson sw "$single_wall" --argjson tck "$clk_tck" \
  --argjson chwm "$conc_hwm" --argjson shwm "$single_hwm" --argjson ccpu "$conc_cpu" --argjson scpu "$single_cpu" \
  --argjson srss "$single_edge_rss" --argjson secpu "$single_edge_cpu" --argjson cecpu "$conc_edge_cpu" --argjson registered "$registered" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
  def median: sort | .[length / 2 | floor];
  ($rss | split("\n") | map(select(. != "") | tonumber)) as $r
  | {date: (now | todate), git: $rev, cores: '"$(nproc)"', vms: $n, vm_bytes: $size,
     registered_vms: $registered,
     concurrent: {wall_s: $cw, logical_MBps: ($n * $size / $cw / 1e6),
       wire_MBps: (($c | map(.wire_bytes) | add) / $cw / 1e6),
       payload_bytes: ($c | map(.payload_bytes) | add), wire_bytes: ($c | map(.wire_bytes) | add),
       endpoint_peak_rss_mib: ($chwm / 1024), endpoint_cpu_s: ($ccpu / $tck), edges_cpu_s: $cecpu,
       edge_peak_rss_mib_max: ($r | max / 1024), edge_peak_rss_mib_median: ($r | median / 1024),
       slowest_edge_s: ($c | map(.duration_secs) | max)},
     single: {wall_s: $sw, logical_MBps: ($n * $size / $sw / 1e6),
       wire_MBps: ($s[0].wire_bytes / $sw / 1e6), payload_bytes: $s[0].payload_bytes,
       endpoint_peak_rss_mib: ($shwm / 1024), endpoint_cpu_s: ($scpu / $tck), edges_cpu_s: $secpu,
       edge_peak_rss_mib: ($srss / 1024)}}
  | .concurrent_over_single_rate = (.concurrent.logical_MBps / .single.logical_MBps)
' >"$LOAD_DIR/results.json"

r=$LOAD_DIR/results.json
echo
jq -r '"Load: \(.vms) x \(.vm_bytes) B concurrent vs one VM of \(.vms * .vm_bytes) B, \(.cores) cores, git \(.git)"' "$r"
echo "run        | wall s | logical MB/s | wire MB/s | endpoint peak RSS MiB | CPU s endpoint / edges | edge peak RSS MiB"
echo "-----------+--------+--------------+-----------+-----------------------+------------------------+------------------"
jq -r '.concurrent | [.wall_s, .logical_MBps, .wire_MBps, .endpoint_peak_rss_mib, .endpoint_cpu_s, .edges_cpu_s,
  "\(.edge_peak_rss_mib_max * 10 | round / 10) max, \(.edge_peak_rss_mib_median * 10 | round / 10) median"] | @tsv' "$r" |
  { IFS=$'\t' read -r w l wi h c ec e; printf '%-10s | %6.2f | %12.1f | %9.1f | %21.1f | %10.2f / %9.2f | %s\n' "$(jq .vms "$r") at once" "$w" "$l" "$wi" "$h" "$c" "$ec" "$e"; }
jq -r '.single | [.wall_s, .logical_MBps, .wire_MBps, .endpoint_peak_rss_mib, .endpoint_cpu_s, .edges_cpu_s, .edge_peak_rss_mib] | @tsv' "$r" |
  { IFS=$'\t' read -r w l wi h c ec e; printf '%-10s | %6.2f | %12.1f | %9.1f | %21.1f | %10.2f / %9.2f | %.1f\n' "one VM" "$w" "$l" "$wi" "$h" "$c" "$ec" "$e"; }
jq -r '"concurrent / single logical rate: \(.concurrent_over_single_rate * 100 | round / 100)x; every disk identical (qemu-img compare); \(.registered_vms) VMs in the inventory"' "$r"
echo "results: $r"
