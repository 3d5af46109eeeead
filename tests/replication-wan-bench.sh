#!/usr/bin/env bash
# Benchmark: a replication's delta pass and its switchover, in one run on loopback and on
# the emulated WAN link (tests/wan/wan.sh: 100 Mbit/s, 75 ms each way), against what a user
# would script instead: `rsync --inplace -z` of the same change over ssh on the same link.
# The issue's targets: a delta pass of the 1 GiB disk with 1 % of its blocks changed sends
# at most 2 % of a full lift's wire bytes and is at least 5x faster than rsync on the WAN;
# the switchover of a VM with 1 % changed is at least 20x shorter than a cold lift of it.
#
# Usage (as root, from anywhere):   tests/replication-wan-bench.sh
#   BENCH_DIR=/tmp/gateway-bench   cache of the sample image and replication-wan-results.json
#   BENCH_SIZE=1G                  sample disk size (tests/sample-disk.sh); 256M for a quick run
#   BENCH_FILL=                    percent of the disk holding data (tests/sample-disk.sh's FILL:
#                                  copies of the file set); empty: the file set alone, the rest
#                                  zeros. The file set is under 1 GiB, so a 10 GiB sample disk is
#                                  ~90 % empty, and a cold lift of it sends only the files: that
#                                  bounds "cold lift / switchover" whatever the switchover does
#                                  (~17x at 10 GiB). A legacy 10 GiB VM is rarely that empty:
#                                  BENCH_FILL=60 is a disk 60 % full of data that compresses
#                                  like the files. Report both.
#   BENCH_CHANGE_PCT=1             share of the disk's 64 KiB blocks rewritten before the delta
#                                  pass, and again before the switchover
#   BENCH_CHUNK_KIB=64             the replication's chunk size
#   BENCH_LINKS="loopback wan"     where to run: loopback (127.0.0.1), wan (the emulated link)
#   BENCH_RATE=100mbit BENCH_DELAY_MS=75 BENCH_LOSS=0   the emulated link
#   BENCH_BUILD=1                  cargo build --release --workspace first (0: use BENCH_BIN)
#   BENCH_BIN=target/release       where the binaries are
#   BENCH_KEEP=1                   keep the run's temp dir (with each link's logs)
#   BENCH_LOG=warn                 edge-agent and cloud-endpoint log level (info: timings of
#                                  each step, in $BENCH_DIR/replication-wan.*/<link>/*.log)
#
# Per link: a first pass (a full lift into a replica); the "guest" rewrites BENCH_CHANGE_PCT %
# of the 64 KiB blocks (new data that compresses like the disk); a delta pass (wall, wire
# bytes); rsync --inplace -z of the same change onto a copy of the original (wall, bytes
# sent); one more change of the same size, the source powered off, a switchover (wall: the
# downtime, the source being stopped before it starts); a cold lift of the same changed disk
# (wall: the downtime of a cold migration). Each copy is checked with qemu-img compare.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
wan=$root/tests/wan/wan.sh
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_FILL=${BENCH_FILL:-}
BENCH_LOG=${BENCH_LOG:-warn}
BENCH_CHANGE_PCT=${BENCH_CHANGE_PCT:-1}
BENCH_CHUNK_KIB=${BENCH_CHUNK_KIB:-64}
BENCH_LINKS=${BENCH_LINKS:-loopback wan}
BENCH_RATE=${BENCH_RATE:-100mbit}
BENCH_DELAY_MS=${BENCH_DELAY_MS:-75}
BENCH_LOSS=${BENCH_LOSS:-0}
log() { printf '[replication-wan-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, tc, iptables, sshd, apt-get)"
[[ $BENCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "BENCH_SIZE=$BENCH_SIZE is not like 1G or 256M"
[ -z "$BENCH_FILL" ] || [[ $BENCH_FILL =~ ^[0-9]+$ ]] || die "BENCH_FILL=$BENCH_FILL is not a percentage like 60"
for l in $BENCH_LINKS; do case $l in loopback | wan) ;; *) die "BENCH_LINKS: $l is neither loopback nor wan" ;; esac; done
need_pkgs=()
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh >/dev/null || need_pkgs+=(openssh-client)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
rsync_z=(--compress); rsync --version | grep -A1 -i '^Compress list' | grep -qw zstd && rsync_z=(--compress --compress-choice=zstd)

if [ "${BENCH_BUILD:-1}" = 1 ]; then
  log "cargo build --release --workspace"
  (cd "$root" && cargo build --release --workspace --quiet)
fi
bin=${BENCH_BIN:-$root/target/release}
for b in edge-agent cloud-endpoint certs wan-relay; do [ -x "$bin/$b" ] || die "no $bin/$b (cargo build --release --workspace)"; done

img=$(sample_disk "$BENCH_SIZE" "$BENCH_FILL")
size=$(stat -c %s "$img")
data=$(($(stat -c %b "$img") * $(stat -c %B "$img")))
tmp=$(mktemp -d "$BENCH_DIR/replication-wan.XXXXXX")
export WAN_PREFIX=rb$$ WAN_RELAY=$bin/wan-relay
link_up='' ce_pid='' sshd_pid=''
stop_servers() {
  for pid in $ce_pid $sshd_pid; do kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  ce_pid='' sshd_pid=''
}
cleanup() {
  local rc=$?
  stop_servers
  if [ -n "$link_up" ]; then "$wan" down || true; fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

"$bin/certs" ca --out "$tmp/pki" >/dev/null
"$bin/certs" endpoint --ca "$tmp/pki" --out "$tmp/pki" --name 127.0.0.1 --name 10.77.2.2 >/dev/null
"$bin/certs" edge --ca "$tmp/pki" --out "$tmp/pki" --name replication-bench-edge >/dev/null
mkdir -p "$tmp/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/client_key"
cp "$tmp/ssh/client_key.pub" "$tmp/ssh/authorized_keys"
ssh_o="-i $tmp/ssh/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"

# The guest's writes (as tests/replication-bench.sh): BENCH_CHANGE_PCT % of the 64 KiB
# blocks at random places (seeded), each a block from elsewhere on the disk with its bytes
# permuted: new data that compresses like the disk, which rsync cannot find elsewhere.
change() { # disk, seed: prints the bytes written
  python3 - "$1" "$BENCH_CHANGE_PCT" "$2" <<'PY'
import os, random, sys
path, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
block = 64 * 1024
with open(path, "r+b") as f:
    size = os.fstat(f.fileno()).st_size
    blocks = size // block
    rng = random.Random(seed)
    picks = rng.sample(range(blocks), max(1, int(blocks * pct / 100)))
    perm = list(range(256))
    rng.shuffle(perm)
    table = bytes(perm)
    for b in picks:
        f.seek(rng.randrange(blocks) * block)
        data = f.read(block).translate(table)
        if len(set(data)) == 1:
            data = os.urandom(block // 4) * 4
        f.seek(b * block)
        f.write(data)
    print(len(picks) * block)
PY
}

# One link: loopback (host namespace, 127.0.0.1) or wan (servers in the cloud namespace at
# 10.77.2.2, clients in the on-prem one). Appends one JSON object to $tmp/cases.jsonl.
run_link() {
  local link=$1 host on_prem=() on_cloud=() dir=$tmp/$1
  mkdir -p "$dir/vm"
  if [ "$link" = wan ]; then
    RATE=$BENCH_RATE DELAY_MS=$BENCH_DELAY_MS LOSS=$BENCH_LOSS UDP_MEM_MAX=8388608 "$wan" up
    link_up=1
    host=10.77.2.2 on_prem=("$wan" exec onprem) on_cloud=("$wan" exec cloud)
  else
    host=127.0.0.1
  fi
  cp --reflink=auto --sparse=always "$img" "$dir/vm/db01.img"
  cp --reflink=auto --sparse=always "$img" "$dir/rsync-dst.img"
  write_vmx "$dir/vm/db01.vmx" db01 db01.img
  local port=4433 ssh_port=2222
  while [ -n "$("${on_cloud[@]}" ss -Hlnu "sport = :$port")" ]; do port=$((port + 1)); done
  while [ -n "$("${on_cloud[@]}" ss -Hlnt "sport = :$ssh_port")" ]; do ssh_port=$((ssh_port + 1)); done
  "${on_cloud[@]}" env CLOUD_ENDPOINT_LISTEN="$host:$port" CLOUD_ENDPOINT_API_LISTEN=off \
    CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true \
    CLOUD_ENDPOINT_CERT="$tmp/pki/endpoint.pem" CLOUD_ENDPOINT_KEY="$tmp/pki/endpoint.key" \
    CLOUD_ENDPOINT_EDGE_CA="$tmp/pki/ca.pem" CLOUD_ENDPOINT_DATASTORE_DIR="$dir/datastore" \
    CLOUD_ENDPOINT_DATABASE="$dir/inventory.db" CLOUD_ENDPOINT_LOG="$BENCH_LOG" \
    "$bin/cloud-endpoint" serve >"$dir/cloud-endpoint.log" 2>&1 &
  ce_pid=$!
  cat >"$dir/sshd_config" <<EOF
Port $ssh_port
ListenAddress $host
HostKey $tmp/ssh/host_key
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $tmp/ssh/authorized_keys
StrictModes no
UsePAM no
EOF
  "${on_cloud[@]}" /usr/sbin/sshd -D -f "$dir/sshd_config" 2>"$dir/sshd.log" &
  sshd_pid=$!
  for _ in $(seq 100); do
    [ -n "$("${on_cloud[@]}" ss -Hlnu "sport = :$port")" ] && [ -n "$("${on_cloud[@]}" ss -Hlnt "sport = :$ssh_port")" ] && break
    sleep 0.1
  done
  [ -n "$("${on_cloud[@]}" ss -Hlnu "sport = :$port")" ] || { tail "$dir/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
  local link_args=()
  [ "$link" = wan ] && link_args=(--link-rate "$BENCH_RATE" --link-rtt "$((2 * BENCH_DELAY_MS))ms")
  edge() { # subcommand, extra args...
    local cmd=$1; shift
    "${on_prem[@]}" env EDGE_AGENT_LOG="$BENCH_LOG" "$bin/edge-agent" "$cmd" --vmx "$dir/vm/db01.vmx" --url "quic://$host:$port" \
      --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
      --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --state-dir "$dir/state" \
      --receipt "$dir/receipt.json" --chunk-kib "$BENCH_CHUNK_KIB" "${link_args[@]}" --json "$@" 2>>"$dir/edge.log" | tail -n1
  }
  local t0 t1 first delta switch cold changed changed2 first_wall delta_wall rsync_wall switch_wall cold_wall rsync_sent
  cat "$dir/vm/db01.img" >/dev/null
  log "$link: first pass, the whole disk into a replica ($size bytes, chunks of $BENCH_CHUNK_KIB KiB)"
  sync; t0=$(now); first=$(edge replicate); t1=$(now)
  [ "$(jq -r .replica <<<"$first")" = true ] || die "$link: first pass: $first"
  first_wall=$(secs "$t0" "$t1")
  changed=$(change "$dir/vm/db01.img" 1)
  log "$link: the guest rewrote $changed bytes; delta pass"
  sync; t0=$(now); delta=$(edge replicate); t1=$(now)
  delta_wall=$(secs "$t0" "$t1")
  [ "$(jq -r .replica <<<"$delta")" = true ] || die "$link: delta pass: $delta"
  log "$link: delta pass $delta_wall s, $(jq .wire_bytes <<<"$delta") wire bytes; rsync --inplace ${rsync_z[*]} of the same change"
  sync; t0=$(now)
  "${on_prem[@]}" rsync --inplace --no-whole-file "${rsync_z[@]}" --stats -e "ssh $ssh_o -p $ssh_port" \
    "$dir/vm/db01.img" "root@$host:$dir/rsync-dst.img" >"$dir/rsync.log" 2>&1 || { cat "$dir/rsync.log" >&2; die "$link: rsync"; }
  t1=$(now)
  rsync_wall=$(secs "$t0" "$t1")
  rsync_sent=$(sed -n 's/^Total bytes sent: \([0-9,.]*\).*/\1/p' "$dir/rsync.log" | tr -d ',.')
  cmp -s "$dir/vm/db01.img" "$dir/rsync-dst.img" || die "$link: rsync's copy differs"
  changed2=$(change "$dir/vm/db01.img" 2)
  log "$link: rsync $rsync_wall s; the guest rewrote $changed2 more bytes and was powered off; switchover"
  sync; t0=$(now); switch=$(edge switchover); t1=$(now)
  switch_wall=$(secs "$t0" "$t1")
  [ "$(jq -r .vm_id <<<"$switch")" != null ] || die "$link: switchover: $switch"
  qemu-img compare "$dir/vm/db01.img" "$dir/datastore/db01/db01.vmdk" >/dev/null || die "$link: the switched-over copy differs"
  log "$link: switchover $switch_wall s; a cold lift of the same (changed, stopped) disk"
  rm -rf "$dir/state"
  sync; t0=$(now); cold=$(edge migrate --no-dedup --name db01-cold); t1=$(now)
  cold_wall=$(secs "$t0" "$t1")
  qemu-img compare "$dir/vm/db01.img" "$dir/datastore/db01-cold/db01-cold.vmdk" >/dev/null || die "$link: the cold copy differs"
  log "$link: cold lift $cold_wall s"
  stop_servers
  if [ "$link" = wan ]; then "$wan" down; link_up=''; fi
  jq -nc --arg link "$link" --argjson first "$first" --argjson delta "$delta" --argjson switch "$switch" --argjson cold "$cold" \
    --arg fw "$first_wall" --arg dw "$delta_wall" --arg rw "$rsync_wall" --arg rs "${rsync_sent:-0}" \
    --arg sw "$switch_wall" --arg cw "$cold_wall" --arg changed "$changed" '
    {link: $link, changed_bytes: ($changed|tonumber),
     first_pass: {wall_s: ($fw|tonumber), wire_bytes: $first.wire_bytes},
     delta_pass: {wall_s: ($dw|tonumber), wire_bytes: $delta.wire_bytes, sent_bytes: $delta.sent_bytes},
     rsync_inplace_z: {wall_s: ($rw|tonumber), bytes_sent: ($rs|tonumber)},
     switchover: {wall_s: ($sw|tonumber), wire_bytes: $switch.wire_bytes},
     cold_lift: {wall_s: ($cw|tonumber), wire_bytes: $cold.wire_bytes}}
    | .delta_wire_share_of_full = (.delta_pass.wire_bytes / .first_pass.wire_bytes)
    | .delta_speedup_over_rsync = (.rsync_inplace_z.wall_s / .delta_pass.wall_s)
    | .switchover_shorter_than_cold = (.cold_lift.wall_s / .switchover.wall_s)' >>"$tmp/cases.jsonl"
  if [ "${BENCH_KEEP:-0}" = 1 ]; then rm -f "$dir"/*.img "$dir"/vm/*.img; rm -rf "$dir/datastore"; else rm -rf "$dir"; fi
}

for link in $BENCH_LINKS; do run_link "$link"; done

r=$BENCH_DIR/replication-wan-results.json
jq -n --slurpfile cases "$tmp/cases.jsonl" --argjson size "$size" --arg pct "$BENCH_CHANGE_PCT" \
  --arg chunk "$BENCH_CHUNK_KIB" --arg fill "${BENCH_FILL:-}" --argjson data "$data" --arg wan "$BENCH_RATE, ${BENCH_DELAY_MS} ms each way, loss $BENCH_LOSS" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
  {date: (now | todate), git: $rev, logical_bytes: $size, data_bytes: $data, fill_pct: (if $fill == "" then null else ($fill|tonumber) end), change_pct: ($pct|tonumber), chunk_kib: ($chunk|tonumber),
   wan: $wan, cores: '"$(nproc)"', cases: $cases}' >"$r"
echo
jq -r '"Replication of \(.logical_bytes) bytes (\(.data_bytes) of them allocated), \(.change_pct) % of 64 KiB blocks rewritten, chunks of \(.chunk_kib) KiB; wan = \(.wan); git \(.git)"' "$r"
echo
echo "| link | first pass | delta pass | delta wire / full | rsync --inplace -z | delta vs rsync | switchover | cold lift | cold / switchover |"
echo "|---|---|---|---|---|---|---|---|---|"
jq -r '.cases[] | "| \(.link) | \(.first_pass.wall_s) s, \(.first_pass.wire_bytes) B | \(.delta_pass.wall_s) s, \(.delta_pass.wire_bytes) B | \(.delta_wire_share_of_full*10000|round/100) % | \(.rsync_inplace_z.wall_s) s, \(.rsync_inplace_z.bytes_sent) B sent | \(.delta_speedup_over_rsync*100|round/100)x | \(.switchover.wall_s) s | \(.cold_lift.wall_s) s | \(.switchover_shorter_than_cold*100|round/100)x |"' "$r"
echo "results: $r"
