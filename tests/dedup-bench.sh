#!/usr/bin/env bash
# Benchmark: ten clones of one template, lifted with deduplication (the cloud copies the
# chunks it holds from the template's lift) against the same ten lifted in full
# (`--no-dedup`), on loopback. Each clone is the template with a few blocks changed (a
# hostname, keys: BENCH_CLONE_CHANGES blocks of 4 KiB at random places).
#
# Usage (as root, from anywhere):   tests/dedup-bench.sh
#   BENCH_DIR=/tmp/gateway-bench  cache of the sample image (shared with tests/bench.sh) and
#                                 dedup-results.json
#   BENCH_SIZE=256M               the template's disk (tests/sample-disk.sh: real files and
#                                 zeros); 1G for the realistic disk of tests/bench.sh
#   BENCH_CLONES=10
#   BENCH_CLONE_CHANGES=16        4 KiB blocks each clone changes
#   BENCH_KEEP=1                  keep the run's temp dir
#
# Steps: lift the template; lift each clone (deduplicated); lift each clone again under
# another name with --no-dedup (full lifts); qemu-img compare of every cloud copy with its
# source. Reports wire bytes and wall time of both series.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
BENCH_SIZE=${BENCH_SIZE:-256M}
BENCH_CLONES=${BENCH_CLONES:-10}
BENCH_CLONE_CHANGES=${BENCH_CLONE_CHANGES:-16}
log() { printf '[dedup-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get)"
[[ $BENCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "BENCH_SIZE=$BENCH_SIZE is not like 1G or 256M"
need_pkgs=()
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

log "cargo build --release --workspace"
(cd "$root" && cargo build --release --workspace --quiet)
bin=$root/target/release

img=$(sample_disk "$BENCH_SIZE")

tmp=$(mktemp -d "$BENCH_DIR/dedup.XXXXXX")
ce_pid=''
cleanup() {
  local rc=$?
  [ -n "$ce_pid" ] && kill -TERM "$ce_pid" 2>/dev/null && wait "$ce_pid" 2>/dev/null || true
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { local p=$2; while [ -n "$(ss -Hln"$1" "sport = :$p")" ]; do p=$((p + 1)); done; echo "$p"; }
wait_listen() {
  for _ in $(seq 100); do [ -n "$(ss -Hln"$1" "sport = :$2")" ] && return 0; sleep 0.1; done
  die "nothing listens on port $2 after 10 s"
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

vm() { # name, disk file: a VM folder with a .vmx naming the disk
  mkdir -p "$tmp/$1"
  write_vmx "$tmp/$1/$1.vmx" "$1" "$2"
}
vm tpl tpl.img
cp --reflink=auto --sparse=always "$img" "$tmp/tpl/tpl.img"
for i in $(seq -w 1 "$BENCH_CLONES"); do
  vm "clone$i" disk.img
  cp --reflink=auto --sparse=always "$img" "$tmp/clone$i/disk.img"
  python3 - "$tmp/clone$i/disk.img" "$BENCH_CLONE_CHANGES" "$i" <<'PY'
import os, random, sys
path, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    blocks = os.fstat(f.fileno()).st_size // 4096
    rng = random.Random(seed)
    for b in rng.sample(range(blocks), n):
        f.seek(b * 4096)
        f.write(os.urandom(4096))
PY
done

quic_port=$(free_port u 4433)
"$bin/certs" quickstart --out "$tmp/pki" >/dev/null
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$quic_port CLOUD_ENDPOINT_CERT=$tmp/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$tmp/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$tmp/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$tmp/datastore CLOUD_ENDPOINT_DATABASE=$tmp/inventory.db \
  CLOUD_ENDPOINT_LOG=${CLOUD_ENDPOINT_LOG:-warn} CLOUD_ENDPOINT_API_LISTEN=off
"$bin/cloud-endpoint" serve >"$tmp/cloud-endpoint.log" 2>&1 &
ce_pid=$!
wait_listen u "$quic_port"
lift() { # folder, cloud name, extra args...
  local dir=$1 name=$2; shift 2
  "$bin/edge-agent" migrate --vmx "$tmp/$dir/$dir.vmx" --name "$name" --url "quic://127.0.0.1:$quic_port" \
    --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
    --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --state-dir "$tmp/state" \
    --receipt "$tmp/$name.receipt.json" --json "$@" 2>>"$tmp/edge.log" | tail -n1
}
compare() { # source disk, cloud name
  qemu-img compare -q "$1" "$tmp/datastore/$2/$2.vmdk" || die "$2 differs from $1"
}

log "lifting the template"
lift tpl tpl >"$tmp/tpl.json"
compare "$tmp/tpl/tpl.img" tpl
series() { # label, extra args: lifts every clone, prints "wire_bytes seconds dedup_bytes"
  local label=$1; shift
  local wire=0 dedup=0 t0 t1
  t0=$(now)
  for i in $(seq -w 1 "$BENCH_CLONES"); do
    lift "clone$i" "$label$i" "$@" >"$tmp/$label$i.json"
    wire=$((wire + $(jq .wire_bytes "$tmp/$label$i.json")))
    dedup=$((dedup + $(jq .dedup_bytes "$tmp/$label$i.json")))
  done
  t1=$(now)
  for i in $(seq -w 1 "$BENCH_CLONES"); do compare "$tmp/clone$i/disk.img" "$label$i"; done
  echo "$wire $(secs "$t0" "$t1") $dedup"
}
log "lifting $BENCH_CLONES clones, deduplicated"
read -r dwire dsecs ddedup < <(series dclone)
log "lifting the same $BENCH_CLONES clones in full (--no-dedup)"
read -r fwire fsecs _ < <(series fclone --no-dedup)

r=$BENCH_DIR/dedup-results.json
jq -n --slurpfile tpl "$tmp/tpl.json" --arg size "$(stat -c %s "$img")" --arg clones "$BENCH_CLONES" \
  --arg dw "$dwire" --arg ds "$dsecs" --arg dd "$ddedup" --arg fw "$fwire" --arg fs "$fsecs" \
  '{disk_bytes: ($size|tonumber), clones: ($clones|tonumber),
    template: {wire_bytes: $tpl[0].wire_bytes, wall_s: $tpl[0].duration_secs},
    dedup: {wire_bytes: ($dw|tonumber), wall_s: ($ds|tonumber), dedup_bytes: ($dd|tonumber)},
    full: {wire_bytes: ($fw|tonumber), wall_s: ($fs|tonumber)}}
   | .wire_share = (.dedup.wire_bytes / .full.wire_bytes)
   | .per_clone_share_of_template = (.dedup.wire_bytes / .clones / .template.wire_bytes)' >"$r"
jq -r '"template lift:           \(.template.wall_s) s, \(.template.wire_bytes) wire bytes",
       "\(.clones) clones, deduplicated: \(.dedup.wall_s) s, \(.dedup.wire_bytes) wire bytes (\(.dedup.dedup_bytes) B copied in the cloud)",
       "\(.clones) clones, full lifts:   \(.full.wall_s) s, \(.full.wire_bytes) wire bytes",
       "wire bytes, dedup / full: \(.wire_share*10000|round/100) %; each clone \(.per_clone_share_of_template*10000|round/100) % of the template"' "$r"
echo "results: $r"
