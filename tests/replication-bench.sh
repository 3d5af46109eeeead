#!/usr/bin/env bash
# Benchmark: a replication's delta pass and its switchover, against what a user would
# script instead: `rsync --inplace -z` of the same disk over ssh (loopback), after the
# same change.
#
# Usage (as root, from anywhere):   tests/replication-bench.sh
#   BENCH_DIR=/tmp/gateway-bench  cache of the sample image (shared with tests/bench.sh) and
#                                 replication-results.json
#   BENCH_SIZE=1G                 sample disk size; e.g. 256M for a quick run
#   BENCH_CHANGE_PCT=1            share of the disk's 64 KiB blocks the "guest" rewrites
#                                 between passes, at random places, with data copied from
#                                 elsewhere on the disk (compresses like the disk does)
#   BENCH_CHUNK_KIB=64            the replication's chunk size (--chunk-kib; 64 is the
#                                 default of replicate)
#   BENCH_SOURCE=raw              raw: the disk is a raw image and every pass reads all of
#                                 it (compared with rsync); vmdk-snapshots: the disk is a
#                                 VMware snapshot chain (a monolithicSparse base and deltas,
#                                 the VM "running" with VMware's lock), each pass reads only
#                                 the grains of the deltas frozen since the last one
#   BENCH_KEEP=1                  keep the run's temp dir
#   BENCH_QEMU=1                  also replicate the same disk (as qcow2) from a QEMU that
#                                 runs it (`--qmp`: QEMU's dirty bitmaps), change the same
#                                 share of blocks through QEMU, and time `switchover --qmp`
#                                 (stop, incremental backup, last pass, commit, quit)
#                                 against the cold lift; needs qemu-system-x86_64
#
# Steps: a first pass (a full lift into a replica); the change; a delta pass (timed, wire
# bytes) and rsync of the same change onto a copy of the original (timed, bytes sent);
# a switchover after one more change of the same size (the "downtime": the source is
# powered off before it); a cold lift of the changed disk for comparison; qemu-img compare
# of both copies with the source.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_CHANGE_PCT=${BENCH_CHANGE_PCT:-1}
BENCH_CHUNK_KIB=${BENCH_CHUNK_KIB:-64}
BENCH_SOURCE=${BENCH_SOURCE:-raw}
log() { printf '[replication-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sshd, apt-get)"
[[ $BENCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "BENCH_SIZE=$BENCH_SIZE is not like 1G or 256M"
case $BENCH_SOURCE in raw | vmdk-snapshots) ;; *) die "BENCH_SOURCE=$BENCH_SOURCE is neither raw nor vmdk-snapshots" ;; esac
need_pkgs=()
[ -x /usr/bin/time ] || need_pkgs+=(time)
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v rsync >/dev/null || need_pkgs+=(rsync)
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
size=$(stat -c %s "$img")

tmp=$(mktemp -d "$BENCH_DIR/replication.XXXXXX")
ce_pid='' sshd_pid='' qemu_pid=''
cleanup() {
  local rc=$?
  for pid in $qemu_pid $sshd_pid $ce_pid; do kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
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

# The source: a private copy the "guest" writes into; rsync's destination: a copy of the
# original, as the cloud's replica holds it after the first pass.
mkdir -p "$tmp/vm"
cp --reflink=auto --sparse=always "$img" "$tmp/vm/db01.img"
cp --reflink=auto --sparse=always "$img" "$tmp/rsync-dst.img"
write_vmx "$tmp/vm/db01.vmx" db01 db01.img

# The guest's writes: BENCH_CHANGE_PCT % of the 64 KiB blocks, at random places (seeded),
# each new data that compresses like the disk: a block from a random place of the disk
# with its bytes permuted (a copy would let rsync find it elsewhere in the file and send a
# reference instead of the data).
change() {
  python3 - "$tmp/vm/db01.img" "$BENCH_CHANGE_PCT" "$1" <<'PY'
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
            data = os.urandom(block // 4) * 4  # new data where the disk was empty
        f.seek(b * block)
        f.write(data)
    print(len(picks) * block)
PY
}

# The VMware variant: the sample disk as a monolithicSparse base with a snapshot the
# running VM writes into; the guest's writes go into the newest delta (qemu-io), a new
# snapshot freezes it before the delta pass, and the VM is powered off (its lock removed)
# before the switchover.
vmdk_change() { # seed, delta file: prints the bytes written
  mkdir -p "$tmp/blocks"
  python3 - "$tmp/vm/db01.img" "$BENCH_CHANGE_PCT" "$1" "$tmp/blocks" <<'PY' >"$tmp/blocks/plan"
import os, random, sys
path, pct, seed, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
block = 64 * 1024
with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    blocks = size // block
    rng = random.Random(seed)
    picks = rng.sample(range(blocks), max(1, int(blocks * pct / 100)))
    perm = list(range(256))
    rng.shuffle(perm)
    table = bytes(perm)
    for i, b in enumerate(picks):
        f.seek(rng.randrange(blocks) * block)
        data = f.read(block).translate(table)
        if len(set(data)) == 1:
            data = os.urandom(block // 4) * 4
        name = os.path.join(out, f"{seed}-{i}")
        with open(name, "wb") as o:
            o.write(data)
        print(f"write -q -s {name} {b * block} {block}")
PY
  local args=() n
  while read -r line; do args+=(-c "$line"); done <"$tmp/blocks/plan"
  qemu-io "${args[@]}" "$2" >/dev/null
  n=$(grep -c . "$tmp/blocks/plan")
  rm -rf "$tmp/blocks"
  echo $((n * 65536))
}
snapshot() { # parent file name, delta file name: the .vmx names the delta from now on
  qemu-img create -q -f vmdk -b "$1" -F vmdk "$tmp/vm/$2"
  sed -i "s/^scsi0:0.fileName = .*/scsi0:0.fileName = \"$2\"/" "$tmp/vm/db01.vmx"
}
snapshots_bench() {
  log "the sample disk as a VMware snapshot chain: db01.vmdk (monolithicSparse) <- db01-000001.vmdk, running"
  qemu-img convert -O vmdk -o subformat=monolithicSparse "$tmp/vm/db01.img" "$tmp/vm/db01.vmdk"
  snapshot db01.vmdk db01-000001.vmdk
  mkdir "$tmp/vm/db01.vmx.lck"
  log "first pass: the frozen base into a replica ($size bytes, chunks of $BENCH_CHUNK_KIB KiB)"
  sync; t0=$(now); first=$(edge replicate); t1=$(now)
  [ "$(jq -r .replica <<<"$first")" = true ] || die "first pass: $first"
  first_wall=$(secs "$t0" "$t1")
  changed=$(vmdk_change 1 "$tmp/vm/db01-000001.vmdk")
  snapshot db01-000001.vmdk db01-000002.vmdk
  log "the guest wrote $changed bytes into db01-000001.vmdk, then a snapshot froze it; delta pass"
  sync; t0=$(now); delta=$(edge replicate); t1=$(now)
  delta_wall=$(secs "$t0" "$t1")
  [ "$(jq -r .replica <<<"$delta")" = true ] || die "delta pass: $delta"
  changed2=$(vmdk_change 2 "$tmp/vm/db01-000002.vmdk")
  rmdir "$tmp/vm/db01.vmx.lck"
  log "the guest wrote $changed2 more bytes into db01-000002.vmdk and was powered off; switchover"
  sync; t0=$(now); switch=$(edge switchover); t1=$(now)
  switch_wall=$(secs "$t0" "$t1")
  vm_id=$(jq -r .vm_id <<<"$switch")
  [ "${vm_id#vm-}" != "$vm_id" ] || die "switchover: $switch"
  qemu-img compare "$tmp/vm/db01-000002.vmdk" "$tmp/datastore/db01/db01.vmdk" >/dev/null || die "the switched-over copy differs"
  log "a cold lift of the same (changed, stopped) VM, for comparison"
  rm -rf "$tmp/state"
  sync; t0=$(now); cold=$(edge migrate --name db01-cold); t1=$(now)
  cold_wall=$(secs "$t0" "$t1")
  qemu-img compare "$tmp/vm/db01-000002.vmdk" "$tmp/datastore/db01-cold/db01-cold.vmdk" >/dev/null || die "the cold copy differs"
  jq -n --argjson size "$size" --arg pct "$BENCH_CHANGE_PCT" --arg chunk "$BENCH_CHUNK_KIB" \
    --argjson first "$first" --argjson delta "$delta" --argjson switch "$switch" --argjson cold "$cold" \
    --arg fw "$first_wall" --arg dw "$delta_wall" --arg sw "$switch_wall" --arg cw "$cold_wall" \
    --arg changed "$changed" --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
    {date: (now | todate), git: $rev, source: "vmdk-snapshots", logical_bytes: $size,
     change_pct: ($pct|tonumber), changed_bytes: ($changed|tonumber), chunk_kib: ($chunk|tonumber),
     first_pass: {wall_s: ($fw|tonumber), wire_bytes: $first.wire_bytes, read_bytes: $first.read_bytes},
     delta_pass: {wall_s: ($dw|tonumber), wire_bytes: $delta.wire_bytes, sent_bytes: $delta.sent_bytes, read_bytes: $delta.read_bytes},
     switchover: {wall_s: ($sw|tonumber), wire_bytes: $switch.wire_bytes, read_bytes: $switch.read_bytes},
     cold_lift: {wall_s: ($cw|tonumber), wire_bytes: $cold.wire_bytes}}
    | .delta_wire_share_of_full = (.delta_pass.wire_bytes / .first_pass.wire_bytes)
    | .switchover_shorter_than_cold = (.cold_lift.wall_s / .switchover.wall_s)' >"$BENCH_DIR/replication-snapshots-results.json"
  r=$BENCH_DIR/replication-snapshots-results.json
  echo
  jq -r '"Replication of a VMware snapshot chain, \(.logical_bytes) bytes, \(.change_pct) % of 64 KiB blocks written between passes (\(.changed_bytes) B), chunks of \(.chunk_kib) KiB, loopback, git \(.git)"' "$r"
  jq -r '"first pass (frozen base):  \(.first_pass.wall_s) s, \(.first_pass.wire_bytes) wire bytes",
         "delta pass:                \(.delta_pass.wall_s) s, \(.delta_pass.read_bytes) B read, \(.delta_pass.wire_bytes) wire bytes (\(.delta_wire_share_of_full*10000|round/100) % of the first pass)",
         "switchover:                \(.switchover.wall_s) s, \(.switchover.read_bytes) B read",
         "cold lift of the same VM:  \(.cold_lift.wall_s) s (the switchover is \(.switchover_shorter_than_cold*100|round/100)x shorter)"' "$r"
  echo "results: $r"
}

quic_port=$(free_port u 4433)
"$bin/certs" quickstart --out "$tmp/pki" >/dev/null
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$quic_port CLOUD_ENDPOINT_CERT=$tmp/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$tmp/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$tmp/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$tmp/datastore CLOUD_ENDPOINT_DATABASE=$tmp/inventory.db \
  CLOUD_ENDPOINT_LOG=${CLOUD_ENDPOINT_LOG:-warn} CLOUD_ENDPOINT_API_LISTEN=off
"$bin/cloud-endpoint" serve >"$tmp/cloud-endpoint.log" 2>&1 &
ce_pid=$!
wait_listen u "$quic_port"
edge() { # subcommand, extra args...
  local cmd=$1; shift
  "$bin/edge-agent" "$cmd" --vmx "$tmp/vm/db01.vmx" --url "quic://127.0.0.1:$quic_port" \
    --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
    --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --state-dir "$tmp/state" \
    --receipt "$tmp/receipt.json" --chunk-kib "$BENCH_CHUNK_KIB" --json "$@" 2>>"$tmp/edge.log" | tail -n1
}

if [ "$BENCH_SOURCE" = vmdk-snapshots ]; then
  snapshots_bench
  exit 0
fi

log "first pass: the whole disk into a replica ($size bytes, chunks of $BENCH_CHUNK_KIB KiB)"
sync; t0=$(now); first=$(edge replicate); t1=$(now)
[ "$(jq -r .replica <<<"$first")" = true ] || die "first pass: $first"
first_wall=$(secs "$t0" "$t1")

changed=$(change 1)
log "the guest rewrote $changed bytes; delta pass"
sync; t0=$(now); delta=$(edge replicate); t1=$(now)
delta_wall=$(secs "$t0" "$t1")
[ "$(jq -r .replica <<<"$delta")" = true ] || die "delta pass: $delta"

# rsync of the same change onto the original's copy, over a private sshd on loopback.
ssh_port=$(free_port t 2222)
mkdir -p "$tmp/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/client_key"
cp "$tmp/ssh/client_key.pub" "$tmp/ssh/authorized_keys"
cat >"$tmp/ssh/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $tmp/ssh/host_key
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $tmp/ssh/authorized_keys
StrictModes no
UsePAM no
EOF
/usr/sbin/sshd -D -f "$tmp/ssh/sshd_config" 2>"$tmp/sshd.log" &
sshd_pid=$!
wait_listen t "$ssh_port"
rsync_z=(--compress); rsync --version | grep -A1 -i '^Compress list' | grep -qw zstd && rsync_z=(--compress --compress-choice=zstd)
log "rsync --inplace ${rsync_z[*]} of the same change"
sync; t0=$(now)
rsync --inplace --no-whole-file "${rsync_z[@]}" --stats \
  -e "ssh -i $tmp/ssh/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -p $ssh_port" \
  "$tmp/vm/db01.img" "root@127.0.0.1:$tmp/rsync-dst.img" >"$tmp/rsync.log" 2>&1 || { cat "$tmp/rsync.log" >&2; die rsync; }
t1=$(now)
rsync_wall=$(secs "$t0" "$t1")
rsync_sent=$(sed -n 's/^Total bytes sent: \([0-9,.]*\).*/\1/p' "$tmp/rsync.log" | tr -d ',.')
cmp -s "$tmp/vm/db01.img" "$tmp/rsync-dst.img" || die "rsync's copy differs"

changed2=$(change 2)
log "the guest rewrote $changed2 more bytes and was powered off; switchover"
sync; t0=$(now); switch=$(edge switchover); t1=$(now)
switch_wall=$(secs "$t0" "$t1")
vm_id=$(jq -r .vm_id <<<"$switch")
[ "${vm_id#vm-}" != "$vm_id" ] || die "switchover: $switch"
qemu-img compare "$tmp/vm/db01.img" "$tmp/datastore/db01/db01.vmdk" >/dev/null || die "the switched-over copy differs"

log "a cold lift of the same (changed, stopped) disk, for comparison"
rm -rf "$tmp/state"
sync; t0=$(now); cold=$(edge migrate --name db01-cold); t1=$(now)
cold_wall=$(secs "$t0" "$t1")
qemu-img compare "$tmp/vm/db01.img" "$tmp/datastore/db01-cold/db01-cold.vmdk" >/dev/null || die "the cold copy differs"

# A QEMU source: the same disk as qcow2 (QEMU keeps persistent bitmaps only in qcow2),
# run by a QEMU with no guest code (-machine none): the "guest" writes go through QEMU's
# block layer (qemu-io in the monitor), so its dirty bitmap sees them.
qemu_json=null
if [ "${BENCH_QEMU:-0}" = 1 ]; then
  command -v qemu-system-x86_64 >/dev/null || die "BENCH_QEMU=1 needs qemu-system-x86_64 (tests/setup.sh)"
  mkdir -p "$tmp/qvm"
  qemu-img convert -O qcow2 "$img" "$tmp/qvm/qdb01.qcow2"
  sed 's/db01/qdb01/g; s/qdb01.img/qdb01.qcow2/' "$tmp/vm/db01.vmx" >"$tmp/qvm/qdb01.vmx"
  qsock=$tmp/q.sock
  qemu-system-x86_64 -machine none -nodefaults -display none -qmp "unix:$qsock,server,nowait" \
    -blockdev "{\"driver\":\"qcow2\",\"node-name\":\"drive0\",\"file\":{\"driver\":\"file\",\"filename\":\"$tmp/qvm/qdb01.qcow2\"}}" \
    >"$tmp/qemu.log" 2>&1 &
  qemu_pid=$!
  for _ in $(seq 100); do [ -S "$qsock" ] && break; sleep 0.1; done
  qedge() { # subcommand, extra args...
    local cmd=$1; shift
    "$bin/edge-agent" "$cmd" --vmx "$tmp/qvm/qdb01.vmx" --qmp "$qsock" --url "quic://127.0.0.1:$quic_port" \
      --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
      --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --state-dir "$tmp/qstate" \
      --receipt "$tmp/qreceipt.json" --chunk-kib "$BENCH_CHUNK_KIB" --json "$@" 2>>"$tmp/qedge.log" | tail -n1
  }
  # BENCH_CHANGE_PCT % of the 64 KiB blocks rewritten through QEMU, at random places.
  qchange() {
    python3 - "$qsock" "$tmp/qvm/qdb01.qcow2" "$BENCH_CHANGE_PCT" "$1" "$tmp/qblock" <<'PY'
import json, os, random, socket, sys
sock, path, pct, seed, blockfile = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
block = 64 * 1024
s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rw")
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
f.readline(); cmd("qmp_capabilities")
size = json.loads(os.popen("qemu-img info -U --output=json " + path).read())["virtual-size"]
rng = random.Random(seed)
picks = rng.sample(range(size // block), max(1, int(size // block * pct / 100)))
for b in picks:
    with open(blockfile, "wb") as out:
        out.write(rng.randbytes(block // 4) * 4)  # new data, compressible 4:1
    r = cmd("human-monitor-command", **{"command-line": 'qemu-io drive0 "write -s %s %d %d"' % (blockfile, b * block, block)})
    assert "error" not in r, r
print(len(picks) * block)
PY
  }
  log "QEMU source: first pass (full backup) of $tmp/qvm/qdb01.qcow2"
  qfirst=$(qedge replicate)
  [ "$(jq -r .tracking.mode <<<"$qfirst")" = full ] || die "QEMU first pass: $qfirst"
  qchanged=$(qchange 3)
  log "QEMU source: $qchanged bytes rewritten through QEMU; switchover --qmp"
  sync; t0=$(now); qswitch=$(qedge switchover); t1=$(now)
  qswitch_wall=$(secs "$t0" "$t1")
  [ "$(jq -r .tracking.mode <<<"$qswitch")" = bitmap ] || die "QEMU switchover: $qswitch"
  wait "$qemu_pid" 2>/dev/null || true
  qemu_pid=''
  qemu-img compare "$tmp/qvm/qdb01.qcow2" "$tmp/datastore/qdb01/qdb01.vmdk" >/dev/null || die "the QEMU source's copy differs"
  qemu_json=$(jq -n --arg w "$qswitch_wall" --arg c "$qchanged" --argjson s "$qswitch" \
    '{wall_s: ($w|tonumber), changed_bytes: ($c|tonumber), read_bytes: $s.read_bytes,
      sent_bytes: $s.sent_bytes, wire_bytes: $s.wire_bytes, changed_chunks: $s.tracking.changed_chunks,
      chunks: $s.tracking.chunks}')
fi

jq -n --argjson size "$size" --arg pct "$BENCH_CHANGE_PCT" --arg chunk "$BENCH_CHUNK_KIB" \
  --argjson first "$first" --argjson delta "$delta" --argjson switch "$switch" --argjson cold "$cold" \
  --arg fw "$first_wall" --arg dw "$delta_wall" --arg rw "$rsync_wall" --arg rs "${rsync_sent:-0}" \
  --arg sw "$switch_wall" --arg cw "$cold_wall" --arg changed "$changed" --argjson qemu "$qemu_json" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
  {date: (now | todate), git: $rev, logical_bytes: $size, change_pct: ($pct|tonumber),
   changed_bytes: ($changed|tonumber), chunk_kib: ($chunk|tonumber),
   first_pass: {wall_s: ($fw|tonumber), wire_bytes: $first.wire_bytes},
   delta_pass: {wall_s: ($dw|tonumber), wire_bytes: $delta.wire_bytes, sent_bytes: $delta.sent_bytes},
   rsync_inplace_z: {wall_s: ($rw|tonumber), bytes_sent: ($rs|tonumber)},
   switchover: {wall_s: ($sw|tonumber), wire_bytes: $switch.wire_bytes},
   cold_lift: {wall_s: ($cw|tonumber), wire_bytes: $cold.wire_bytes},
   qemu_switchover: $qemu}
  | .delta_wire_share_of_full = (.delta_pass.wire_bytes / .first_pass.wire_bytes)
  | .delta_speedup_over_rsync = (.rsync_inplace_z.wall_s / .delta_pass.wall_s)
  | .switchover_shorter_than_cold = (.cold_lift.wall_s / .switchover.wall_s)
  | if .qemu_switchover then .qemu_switchover.shorter_than_cold = (.cold_lift.wall_s / .qemu_switchover.wall_s) else . end' \
  >"$BENCH_DIR/replication-results.json"
r=$BENCH_DIR/replication-results.json
echo
jq -r '"Replication of \(.logical_bytes) bytes, \(.change_pct) % of 64 KiB blocks rewritten (\(.changed_bytes) B), chunks of \(.chunk_kib) KiB, loopback, git \(.git)"' "$r"
jq -r '"first pass (full):    \(.first_pass.wall_s) s, \(.first_pass.wire_bytes) wire bytes",
       "delta pass:           \(.delta_pass.wall_s) s, \(.delta_pass.wire_bytes) wire bytes (\(.delta_wire_share_of_full*10000|round/100) % of the full pass), \(.delta_pass.sent_bytes) B of chunks sent",
       "rsync --inplace -z:   \(.rsync_inplace_z.wall_s) s, \(.rsync_inplace_z.bytes_sent) bytes sent",
       "delta pass vs rsync:  \(.delta_speedup_over_rsync*100|round/100)x faster",
       "switchover (1 more change of the same size): \(.switchover.wall_s) s; cold lift of the same disk: \(.cold_lift.wall_s) s (\(.switchover_shorter_than_cold*100|round/100)x shorter)"' "$r"
jq -r 'select(.qemu_switchover) | .qemu_switchover |
       "QEMU source, switchover --qmp after \(.changed_bytes) B rewritten: \(.wall_s) s (\(.shorter_than_cold*100|round/100)x shorter than the cold lift), \(.changed_chunks) of \(.chunks) chunks changed, \(.read_bytes) B read, \(.sent_bytes) B sent"' "$r"
echo "results: $r"
