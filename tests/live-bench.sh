#!/usr/bin/env bash
# Live-migration benchmark (issue "live migration"): the same running guest migrated
#   direct   QEMU to QEMU over plain TCP, no tunnel (tests/live/direct-migrate.py: NBD
#            storage mirror + pre-copy, libvirt's pause-before-switchover order), and
#   gateway  through the gateway: `edge-agent live-migrate` drives the source over QMP and
#            carries the NBD mirror and the memory stream in zstd tunnel streams of one
#            QUIC connection to `cloud-endpoint`, which runs the destination QEMU,
# on loopback and on the emulated WAN link (tests/wan/wan.sh: 150 ms RTT, 100 Mbit/s).
#
# Same guest on both halves: tests/live/guest.sh's kernel + busybox initramfs (counter loop,
# `dirty=MIB` rewrites MIB MiB of RAM in a loop), the QEMU command line
# `edge-agent qemu-command` prints for a .vmx (1 vCPU, 256 MiB, a 64 MiB qcow2 on scsi0:0
# with LIVE_BENCH_PREFILL MiB of random data at 4 MiB, one e1000 NIC) on the source and the
# destination, a qcow2 destination disk, downtime-limit 300 ms, max-bandwidth 10 GB/s (the
# gateway's own setting; QEMU's default would cap at 128 MiB/s), background mirror.
#
# Usage (root, from anywhere):   tests/live-bench.sh
#   LIVE_BENCH_RUNS=3            runs per case (direct and gateway each; medians reported)
#   LIVE_BENCH_LO=1              0 skips the loopback half
#   LIVE_BENCH_WAN=1             0 skips the WAN half
#   LIVE_BENCH_LO_DIRTY="0 16"   guests on loopback: dirty=MIB values (0 = idle)
#   LIVE_BENCH_WAN_DIRTY="0 4"   guests on the WAN (a dirty=16 guest dirties ~20 MiB/s, more
#                                than 100 Mbit/s carries: pre-copy cannot converge there)
#   LIVE_BENCH_RATE=100mbit      WAN rate (tc syntax; 1gbit for issue 16's long fat link)
#   LIVE_BENCH_DELAY_MS=75       WAN one-way delay (RTT = 2x)
#   LIVE_BENCH_DOWNTIME_MS=300   downtime-limit on both halves
#   LIVE_BENCH_TUNNEL_STREAMS=   QUIC streams per gateway tunnel (edge-agent --tunnel-streams, 1-32);
#                                empty: the agent sizes it from the path (2 x BDP / 1.25 MB);
#                                1: one stream per tunnel, as before protocol version 10
#   LIVE_BENCH_PREFILL=32        MiB of random data on the 64 MiB source disk (for the mirror)
#   LIVE_BENCH_TIMEOUT=300       seconds one migration may take
#   LIVE_BENCH_UDP_MEM_MAX=8388608  raise net.core.rmem_max/wmem_max to this while the WAN
#                                is up (the QUIC sockets ask for 8 MiB); "" keeps them
#   LIVE_BENCH_BUILD=1           cargo build --release -p edge-agent -p cloud-endpoint -p certs
#                                -p e2e --bin wan-relay first (0: use target/release as it is)
#   LIVE_BENCH_DIR=/tmp/live-bench   run folders and results.json
#   LIVE_BENCH_KEEP=0            1 keeps the run folder (logs, images, serial consoles)
#
# Reported per case (medians over the runs) and per run in results.json:
#   total     direct: blockdev-add of the NBD client -> `cont` on the destination
#             (direct-migrate.py total_wall_s); gateway: the summary's total_secs, Ready
#             (the destination waits) -> Committed (the cloud runs and registered it).
#             Neither includes booting the guests or starting the destination QEMU.
#   downtime  QEMU's own figure (query-migrate `downtime` on the source), both halves.
#   memory    QEMU's total-time of the memory migration (query-migrate `total-time`).
#   memory rate  RAM bytes QEMU sent (query-migrate ram.transferred) / memory, in MB/s: the
#             memory stream's rate, the figure the tunnel's streams decide.
#   wire      bytes on the wire during the migration, both directions, counted the same
#             way for both halves:
#             WAN: Ethernet frames received by the two ends' wan0 (rx_bytes of the cloud's
#                  and the on-prem's veth, read from /proc/PID/net/dev, i.e. after the
#                  router segmented GSO packets: wire-sized frames incl. IP/TCP/UDP and
#                  Ethernet headers and retransmissions);
#             loopback: IP bytes counted by an nftables counter on lo's output for the
#                  flows' ports (direct: the NBD and migration TCP ports; gateway: the
#                  endpoint's UDP port); on lo GSO packets are not segmented, so headers
#                  count once per (up to 64 KB) packet.
#             Direct: the whole run (QMP is a unix socket: only the NBD and migration
#             flows use the network). Gateway: from the agent's Ready event to its summary
#             (the tunnels; the handshake, the kernel+initrd upload and the loopback link
#             test come before Ready and are in `wire_all` of results.json).
#   console gap  first destination `counter` line - last source one - the loop's median
#             interval (tests/live/console-gap.py polls both consoles): the guest's view,
#             including bytes still in flight when QEMU counts the migration done; coarse
#             (~one loop interval, and ~0.4 s high on loopback), the same for both halves.
#   Each migration is checked: the guest's counter continues on the destination, the
#   destination disk passes check-disk.py and holds the prefilled data.
# Targets (issue): downtime gateway <= 1.2x direct on loopback; total gateway <= direct on
# the WAN.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
live=$root/tests/live
wan=$root/tests/wan/wan.sh
bin=$root/target/release
LIVE_BENCH_RUNS=${LIVE_BENCH_RUNS:-3}
LIVE_BENCH_LO=${LIVE_BENCH_LO:-1}
LIVE_BENCH_WAN=${LIVE_BENCH_WAN:-1}
LIVE_BENCH_LO_DIRTY=${LIVE_BENCH_LO_DIRTY-0 16}
LIVE_BENCH_WAN_DIRTY=${LIVE_BENCH_WAN_DIRTY-0 4}
LIVE_BENCH_RATE=${LIVE_BENCH_RATE:-100mbit}
LIVE_BENCH_DELAY_MS=${LIVE_BENCH_DELAY_MS:-75}
LIVE_BENCH_DOWNTIME_MS=${LIVE_BENCH_DOWNTIME_MS:-300}
LIVE_BENCH_TUNNEL_STREAMS=${LIVE_BENCH_TUNNEL_STREAMS:-}
LIVE_BENCH_PREFILL=${LIVE_BENCH_PREFILL:-32}
LIVE_BENCH_TIMEOUT=${LIVE_BENCH_TIMEOUT:-300}
LIVE_BENCH_UDP_MEM_MAX=${LIVE_BENCH_UDP_MEM_MAX-8388608}
LIVE_BENCH_DIR=${LIVE_BENCH_DIR:-/tmp/live-bench}
MAX_BW=10000000000 # bytes/s, what edge-agent live-migrate sets
PASSWORD='VMware1!Cloud'
USER_NAME=migrator@cloud.local

log() { printf '[live-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, nftables)"
[[ $LIVE_BENCH_RUNS =~ ^[1-9][0-9]*$ ]] || die "LIVE_BENCH_RUNS=$LIVE_BENCH_RUNS is not a positive number"
for t in jq nft python3 qemu-img qemu-system-x86_64 ip; do
  command -v "$t" >/dev/null || die "$t is needed"
done

if [ "${LIVE_BENCH_BUILD:-1}" = 1 ]; then
  log "cargo build --release -p edge-agent -p cloud-endpoint -p certs -p e2e --bin wan-relay ..."
  (cd "$root" && cargo build --release --quiet -p edge-agent -p cloud-endpoint -p certs) \
    || die "cargo build failed (set LIVE_BENCH_BUILD=0 to use the binaries in $bin as they are)"
  if [ "$LIVE_BENCH_WAN" = 1 ]; then
    (cd "$root" && cargo build --release --quiet -p e2e --bin wan-relay) || die "building wan-relay failed"
  fi
fi
for b in edge-agent cloud-endpoint certs; do [ -x "$bin/$b" ] || die "no $bin/$b"; done

# --- run folder, cleanup ----------------------------------------------------------------
mkdir -p "$LIVE_BENCH_DIR"
tmp=$(mktemp -d "$LIVE_BENCH_DIR/run.XXXXXX")
# The endpoint runs the destination QEMU as its own unprivileged user, which must pass
# through the run folder to the datastore (mktemp makes it 700).
chmod o+x "$LIVE_BENCH_DIR" "$tmp"
nft_table=livebench$$
export WAN_PREFIX=lb$$ WAN_RELAY=$bin/wan-relay RELAY_STATS_SECS=5
ON=$WAN_PREFIX-onprem CL=$WAN_PREFIX-cloud
link_up='' ce_pid='' direct_pid='' agent_pid=''

# Every process whose command line names this run's folder (source and destination
# QEMUs, the ones the endpoint started included), by pid.
kill_run_procs() { # SIGNAL [STRING [STRING2]]: the command line contains both (default: the run folder)
  local sig=${1:-TERM} a=${2:-$tmp/} b=${3:-$tmp/} p c pids=''
  for p in /proc/[0-9]*; do
    [ "${p#/proc/}" = $$ ] && continue
    c=$({ tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null) || continue
    case $c in *"$a"*) case $c in *"$b"*) pids="$pids ${p#/proc/}" ;; esac ;; esac
  done
  for p in $pids; do kill "-$sig" "$p" 2>/dev/null || true; done
}
stop_endpoint() {
  if [ -n "$ce_pid" ]; then
    kill -TERM "$ce_pid" 2>/dev/null || true
    wait "$ce_pid" 2>/dev/null || true
    ce_pid=''
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in $direct_pid $agent_pid; do kill -TERM "$p" 2>/dev/null || true; done
  stop_endpoint
  kill_run_procs TERM
  sleep 0.5
  kill_run_procs KILL
  if [ -n "$link_up" ]; then "$wan" down >/dev/null 2>&1 || true; fi
  nft delete table inet "$nft_table" 2>/dev/null || true
  if [ "${LIVE_BENCH_KEEP:-0}" = 1 ] || [ $rc -ne 0 ]; then log "run folder kept: $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- guest, base disk, PKI --------------------------------------------------------------
"$live/guest.sh" >"$tmp/guest.txt" 2>&1 || { cat "$tmp/guest.txt" >&2; die "tests/live/guest.sh failed"; }
envf=$(sed -n 's/^env file:[[:space:]]*//p' "$tmp/guest.txt")
KERNEL=$(sed -n 's/^KERNEL="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$envf")
INITRD=$(sed -n 's/^INITRD="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$envf")
APPEND=$(sed -n 's/^APPEND="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$envf")
[ -f "$KERNEL" ] && [ -f "$INITRD" ] || die "guest.env does not name a kernel and an initrd"

python3 - "$tmp/base.raw" "$LIVE_BENCH_PREFILL" <<'EOF'
import os, sys
with open(sys.argv[1], "wb") as f:
    f.truncate(64 << 20)
    f.seek(4 << 20)
    for _ in range(int(sys.argv[2])):
        f.write(os.urandom(1 << 20))
EOF
qemu-img convert -f raw -O qcow2 "$tmp/base.raw" "$tmp/base.qcow2"
rm -f "$tmp/base.raw"
# sha256 of the prefilled region of an image (qemu-img dd: count includes skip)
region_sha() {
  local out=$tmp/region.raw
  qemu-img dd -U -f qcow2 -O raw bs=1M skip=4 count=$((4 + LIVE_BENCH_PREFILL)) "if=$1" "of=$out" >/dev/null
  sha256sum "$out" | cut -d' ' -f1
  rm -f "$out"
}
base_sha=$(region_sha "$tmp/base.qcow2")

"$bin/certs" quickstart --out "$tmp/pki" --endpoint-name 10.77.2.2 >/dev/null

vmx() { # DIR NAME DISK
  cat >"$1/$2.vmx" <<EOF
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "$2"
guestOS = "debian12-64"
numvcpus = "1"
memsize = "256"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "$3"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "e1000"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:12:34:56"
EOF
}

free_port() { # tcp|udp
  python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_STREAM if sys.argv[1]=='tcp' else socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}
now() { date +%s.%N; }

# --- byte counters ----------------------------------------------------------------------
# Loopback: one nftables table of this run, a pair of named counters per case.
nft add table inet "$nft_table"
nft add chain inet "$nft_table" out '{ type filter hook output priority 0; policy accept; }'
lo_counters() { # NAME PROTO PORT...: count both directions of these ports on lo
  local name=$1 proto=$2 ports
  shift 2
  ports=$(IFS=,; echo "$*")
  nft add counter inet "$nft_table" "${name}_up"
  nft add counter inet "$nft_table" "${name}_down"
  nft add rule inet "$nft_table" out oif lo "$proto" dport "{ $ports }" counter name "${name}_up"
  nft add rule inet "$nft_table" out oif lo "$proto" sport "{ $ports }" counter name "${name}_down"
}
lo_bytes() { # NAME -> "UP DOWN"
  local u d
  u=$(nft -j list counter inet "$nft_table" "${1}_up" | jq '.nftables[] | select(.counter) | .counter.bytes')
  d=$(nft -j list counter inet "$nft_table" "${1}_down" | jq '.nftables[] | select(.counter) | .counter.bytes')
  echo "$u $d"
}
# WAN: rx_bytes of wan0 in each end's namespace, read through a process living there
# (/proc/PID/net/dev), so no `ip netns exec` runs while data flows.
ns_holder_on='' ns_holder_cl=''
dev_rx() { awk '$1 == "wan0:" { print $2 }' "/proc/$1/net/dev"; }
wan_bytes() { echo "$(dev_rx "$ns_holder_cl") $(dev_rx "$ns_holder_on")"; } # up (arrived at cloud), down
snap() { # NET NAME -> "UP DOWN"
  if [ "$1" = lo ]; then lo_bytes "$2"; else wan_bytes; fi
}

# --- one direct run -----------------------------------------------------------------------
direct_case() { # NET DIRTY RUN
  local net=$1 dirty=$2 run=$3 id=$1-d$2-r$3-direct
  local wd=$tmp/$id args rc=0 b0 b1 t0 t1 res
  mkdir -p "$wd"
  args=(--edge-agent "$bin/edge-agent" --vm-name "lb-$net-d$dirty" --transport tcp --src-image "$tmp/base.qcow2"
        --prefill "$LIVE_BENCH_PREFILL" --dirty "$dirty" --max-bandwidth "$MAX_BW"
        --downtime-limit "$LIVE_BENCH_DOWNTIME_MS" --timeout "$LIVE_BENCH_TIMEOUT" --run-after 5
        --workdir "$wd")
  local nbd_port mig_port
  if [ "$net" = lo ]; then
    nbd_port=$(free_port tcp) mig_port=$(free_port tcp)
    lo_counters "c${id//-/_}" tcp "$nbd_port" "$mig_port"
    args+=(--listen-host 127.0.0.1)
  else
    nbd_port=10809 mig_port=4444
    args+=(--listen-host 10.77.2.2 --src-prefix "ip netns exec $ON" --dst-prefix "ip netns exec $CL")
  fi
  args+=(--nbd-port "$nbd_port" --mig-port "$mig_port")
  log "$id: direct-migrate.py (guest dirty=$dirty)"
  gap_start "$wd" --src "$wd/src-serial.log" --dst "$wd/dst-serial.log"
  b0=$(snap "$net" "c${id//-/_}"); t0=$(now)
  python3 "$live/direct-migrate.py" "${args[@]}" >"$wd/direct.log" 2>&1 &
  direct_pid=$!
  wait "$direct_pid" || rc=$?
  direct_pid=''
  t1=$(now); b1=$(snap "$net" "c${id//-/_}")
  res=$(sed -n 's/^RESULT-JSON: //p' "$wd/direct.log" | tail -n1)
  [ -n "$res" ] || res='{"ok": false, "problems": ["no RESULT-JSON line"]}'
  [ "$rc" = 0 ] || log "$id: direct-migrate.py exit $rc: $(jq -r '.problems | join("; ")' <<<"$res") (log $wd/direct.log)"
  jq -c --arg net "$net" --argjson dirty "$dirty" --argjson run "$run" --argjson rc "$rc" --argjson gap "$(gap_end "$wd")" \
    --arg b0 "$b0" --arg b1 "$b1" --arg t0 "$t0" --arg t1 "$t1" '
    ($b0 | split(" ") | map(tonumber)) as $a | ($b1 | split(" ") | map(tonumber)) as $b |
    {net: $net, dirty: $dirty, run: $run, mode: "direct", ok: (.ok and $rc == 0),
     total_s: .total_wall_s, downtime_ms: .downtime_ms, memory_ms: .total_time_ms,
     passes: .ram_dirty_sync_count, ram_transferred: .ram_transferred, mirror_bytes: .mirror_bytes,
     wire_up: ($b[0] - $a[0]), wire_down: ($b[1] - $a[1]), wire: ($b[0] - $a[0] + $b[1] - $a[1]),
     wire_all: ($b[0] - $a[0] + $b[1] - $a[1]),
     guest_pause_ms: .guest_pause_ms, console: $gap, dirty_rate_mib_s: .dirty_rate_mib_s, boot_s: .boot_s,
     wall_s: (($t1 | tonumber) - ($t0 | tonumber)),
     counter: {src_last: .src_last_counter, dst_first: .dst_first_counter, dst_last: .dst_last_counter},
     prefill_ok: .prefill_copied_ok, problems: .problems}' <<<"$res" >>"$tmp/cases.jsonl"
  report_last
}

# --- one gateway run ----------------------------------------------------------------------
gateway_case() { # NET DIRTY RUN
  local net=$1 dirty=$2 run=$3 id=$1-d$2-r$3-gateway
  local wd=$tmp/$id name=lb-$1-d$2-r$3 prefix=() url link=() rc=0 cmd append
  mkdir -p "$wd"
  qemu-img convert -O qcow2 "$tmp/base.qcow2" "$wd/$name.qcow2"
  vmx "$wd" "$name" "$name.qcow2"
  append="$APPEND"; [ "$dirty" != 0 ] && append="$append dirty=$dirty"
  if [ "$net" = lo ]; then
    url=quic://127.0.0.1:$ce_port
    lo_counters "c${id//-/_}" udp "$ce_port"
  else
    url=quic://10.77.2.2:4433
    prefix=(ip netns exec "$ON")
    link=(--link-rate "$LIVE_BENCH_RATE" --link-rtt "$((2 * LIVE_BENCH_DELAY_MS))ms")
  fi
  [ -n "$LIVE_BENCH_TUNNEL_STREAMS" ] && link+=(--tunnel-streams "$LIVE_BENCH_TUNNEL_STREAMS")
  # The source: the command line the agent expects (it checks it against the .vmx).
  cmd=$("$bin/edge-agent" qemu-command --vmx "$wd/$name.vmx" --qmp "$wd/src.qmp" --serial-log "$wd/src-serial.log" \
        --kernel "$KERNEL" --initrd "$INITRD" --append "$append")
  log "$id: source QEMU (guest dirty=$dirty)"
  local t_boot; t_boot=$(now)
  eval "${prefix[*]} $cmd -daemonize -pidfile $wd/src.pid" >"$wd/src-qemu.log" 2>&1 \
    || { cat "$wd/src-qemu.log" >&2; die "$id: the source QEMU did not start"; }
  local i
  for i in $(seq 1200); do grep -q '^counter 1' "$wd/src-serial.log" 2>/dev/null && break; sleep 0.1; done
  grep -q '^counter 1' "$wd/src-serial.log" || die "$id: the source guest did not start counting"
  local boot_s; boot_s=$(awk -v a="$t_boot" -v b="$(now)" 'BEGIN { print b - a }')
  sleep 3 # as direct-migrate.py: let the guest (and its dirty loop) run a little first
  log "$id: edge-agent live-migrate $url ${link[*]}"
  local b0 br b1 t0 t1 out=$wd/agent.jsonl
  gap_start "$wd" --src "$wd/src-serial.log" --dst-find "$tmp/ds-$net" "$name.console.log"
  b0=$(snap "$net" "c${id//-/_}"); t0=$(now)
  : >"$out"
  # Read the JSON lines as they come: the counters are read at the Ready event.
  (
    set +e
    EDGE_AGENT_PASSWORD=$PASSWORD timeout "$LIVE_BENCH_TIMEOUT" "${prefix[@]}" "$bin/edge-agent" live-migrate \
      --vmx "$wd/$name.vmx" --qmp "$wd/src.qmp" --kernel "$KERNEL" --initrd "$INITRD" --append "$append" \
      --url "$url" --user "$USER_NAME" --ca-bundle "$tmp/pki/ca.pem" --cert "$tmp/pki/edge.pem" \
      --key "$tmp/pki/edge.key" --name "$name" --receipt "$wd/receipt.json" --state-dir "$wd/state" \
      --downtime-ms "$LIVE_BENCH_DOWNTIME_MS" --json "${link[@]}" 2>"$wd/agent.err" \
      | while IFS= read -r line; do
          printf '%s\n' "$line" >>"$out"
          case $line in *'"event":"ready"'*) snap "$net" "c${id//-/_}" >"$wd/bytes.ready" ;; esac
        done
    exit "${PIPESTATUS[0]}"
  ) &
  agent_pid=$!
  wait "$agent_pid" || rc=$?
  agent_pid=''
  t1=$(now); b1=$(snap "$net" "c${id//-/_}")
  br=$(cat "$wd/bytes.ready" 2>/dev/null || echo "$b0")
  local summary forecast
  summary=$(grep '"event":"summary"' "$out" | tail -n1 || true)
  forecast=$(grep '"event":"forecast"' "$out" | tail -n1 || true)
  [ -n "$forecast" ] || forecast=null
  local problems=() src_last='' dst_first='' dst_last='' prefill_ok=false gap=null
  if [ "$rc" != 0 ] || [ -z "$summary" ]; then
    problems+=("edge-agent exit $rc: $(tail -n2 "$wd/agent.err" | tr '\n' ' ')")
    gap_end "$wd" >/dev/null
    log "$id: ${problems[0]}"
    summary='{}'
    kill "$(cat "$wd/src.pid" 2>/dev/null)" 2>/dev/null || true
  else
    # The guest runs in the cloud: its console continues the counter, its disk checks out.
    local vmdir cons disk
    vmdir=$(find "$tmp/ds-$net" -maxdepth 2 -type f -name "$name.console.log" -printf '%h\n' | head -n1)
    cons=$vmdir/$name.console.log
    sleep 5 # as direct-migrate.py --run-after: under load a TCG guest may print one counter in 3 s
    src_last=$(grep -a -o '^counter [0-9]*' "$wd/src-serial.log" | tail -n1 | cut -d' ' -f2)
    dst_first=$(grep -a -o '^counter [0-9]*' "$cons" 2>/dev/null | head -n1 | cut -d' ' -f2)
    dst_last=$(grep -a -o '^counter [0-9]*' "$cons" 2>/dev/null | tail -n1 | cut -d' ' -f2)
    grep -aq 'guest up' "$cons" 2>/dev/null && problems+=("the cloud's guest booted instead of resuming")
    if [ -z "$src_last" ] || [ -z "$dst_first" ] || [ -z "$dst_last" ]; then
      problems+=("no counters (source last '$src_last', cloud first '$dst_first')")
    else
      [ "$dst_first" -eq $((src_last + 1)) ] || [ "$dst_first" -eq $((src_last + 2)) ] \
        || problems+=("the cloud's counter starts at $dst_first, the source's ended at $src_last")
      [ "$dst_last" -gt "$dst_first" ] || problems+=("the cloud's guest does not keep counting")
    fi
    gap=$(gap_end "$wd")
    # Stop the cloud's VM (it would eat CPU in the next cases), then check its disk.
    kill_run_procs TERM "$tmp/ds-$net/" "$name"
    sleep 1
    disk=$(find "$vmdir" -maxdepth 1 -name '*.qcow2' | head -n1)
    if [ -z "$disk" ]; then
      problems+=("no qcow2 disk in $vmdir")
    else
      python3 "$live/check-disk.py" --min-counter "$((src_last + 1))" "$disk" >"$wd/check-disk.txt" 2>&1 \
        || problems+=("check-disk: $(tail -n1 "$wd/check-disk.txt")")
      [ "$(region_sha "$disk")" = "$base_sha" ] && prefill_ok=true || problems+=("the prefilled region differs in the cloud")
    fi
  fi
  local pj
  pj=$(printf '%s\n' "${problems[@]}" | jq -R . | jq -sc 'map(select(length > 0))')
  jq -nc --argjson s "$summary" --argjson f "$forecast" --arg net "$net" --argjson dirty "$dirty" --argjson run "$run" \
    --argjson rc "$rc" --arg b0 "$b0" --arg br "$br" --arg b1 "$b1" --arg t0 "$t0" --arg t1 "$t1" \
    --argjson problems "$pj" --arg src_last "$src_last" --arg dst_first "$dst_first" --arg dst_last "$dst_last" \
    --argjson prefill_ok "$prefill_ok" --arg boot "$boot_s" --argjson gap "$gap" '
    ($b0 | split(" ") | map(tonumber)) as $a | ($br | split(" ") | map(tonumber)) as $r |
    ($b1 | split(" ") | map(tonumber)) as $b |
    {net: $net, dirty: $dirty, run: $run, mode: "gateway", ok: ($rc == 0 and ($problems | length) == 0 and ($s | has("total_secs"))),
     total_s: $s.total_secs, downtime_ms: $s.downtime_ms, memory_ms: (if $s.memory_secs then $s.memory_secs * 1000 | round else null end),
     passes: $s.passes, ram_transferred: $s.ram_transferred, mirror_bytes: $s.mirror_bytes,
     tunnel_plain_bytes: $s.tunnel_plain_bytes, tunnel_wire_bytes: $s.tunnel_wire_bytes,
     wire_up: ($b[0] - $r[0]), wire_down: ($b[1] - $r[1]), wire: ($b[0] - $r[0] + $b[1] - $r[1]),
     wire_all: ($b[0] - $a[0] + $b[1] - $a[1]),
     forecast: (if $f then {verdict: $f.verdict, dirty_bytes_per_s: $f.dirty_bytes_per_s, link_bytes_per_s: $f.link_bytes_per_s, rtt_ms: $f.rtt_ms} else null end),
     console: $gap, boot_s: ($boot | tonumber), wall_s: (($t1 | tonumber) - ($t0 | tonumber)),
     counter: {src_last: ($src_last | tonumber? // null), dst_first: ($dst_first | tonumber? // null), dst_last: ($dst_last | tonumber? // null)},
     prefill_ok: $prefill_ok, problems: $problems}' >>"$tmp/cases.jsonl"
  rm -rf "${vmdir:-/nonexistent}" "$wd/$name.qcow2"
  report_last
}

# The guest-visible pause from the consoles (tests/live/console-gap.py), same for both halves.
gap_start() { # WD ARGS...
  local wd=$1; shift
  python3 "$live/console-gap.py" --timeout "$((LIVE_BENCH_TIMEOUT + 120))" "$@" >"$wd/console-gap.json" 2>"$wd/console-gap.err" &
  echo $! >"$wd/console-gap.pid"
}
gap_end() { # WD -> the JSON (null if none)
  local pid i
  pid=$(cat "$1/console-gap.pid")
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  jq -ec . "$1/console-gap.json" 2>/dev/null || echo null
}

report_last() {
  log "$(tail -n1 "$tmp/cases.jsonl" | jq -r '"\(.net) dirty=\(.dirty) run \(.run) \(.mode): \(if .ok then "ok" else "FAILED \(.problems)" end); total \(.total_s // "-" | tostring | .[0:6]) s, downtime \(.downtime_ms // "-") ms (console gap ~\(.console.pause_est_ms // "-") ms), memory \(.memory_ms // "-") ms in \(.passes // "-") passes, RAM \(.ram_transferred // 0) B, wire \(.wire) B (up \(.wire_up), down \(.wire_down))"')"
}

start_endpoint() { # NET
  local net=$1 env
  rm -rf "$tmp/ds-$net"
  env=(CLOUD_ENDPOINT_API_LISTEN=off CLOUD_ENDPOINT_CERT="$tmp/pki/endpoint.pem" CLOUD_ENDPOINT_KEY="$tmp/pki/endpoint.key"
       CLOUD_ENDPOINT_EDGE_CA="$tmp/pki/ca.pem" CLOUD_ENDPOINT_DATASTORE_DIR="$tmp/ds-$net"
       CLOUD_ENDPOINT_DATABASE="$tmp/inventory-$net.db" CLOUD_ENDPOINT_DOMAIN__DATASTORE__DISK_FORMAT=qcow2
       CLOUD_ENDPOINT_LOG=warn)
  if [ "$net" = lo ]; then
    ce_port=$(free_port udp)
    env CLOUD_ENDPOINT_LISTEN=127.0.0.1:$ce_port "${env[@]}" "$bin/cloud-endpoint" serve >>"$tmp/cloud-endpoint-$net.log" 2>&1 &
    ce_pid=$!
    for _ in $(seq 100); do [ -n "$(ss -Hlnu "sport = :$ce_port")" ] && break; sleep 0.1; done
    [ -n "$(ss -Hlnu "sport = :$ce_port")" ] || { tail "$tmp/cloud-endpoint-$net.log" >&2; die "cloud-endpoint did not start"; }
  else
    ip netns exec "$CL" env CLOUD_ENDPOINT_LISTEN=10.77.2.2:4433 CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true "${env[@]}" "$bin/cloud-endpoint" serve \
      >>"$tmp/cloud-endpoint-$net.log" 2>&1 &
    ce_pid=$!
    for _ in $(seq 100); do [ -n "$(ip netns exec "$CL" ss -Hlnu 'sport = :4433')" ] && break; sleep 0.1; done
    [ -n "$(ip netns exec "$CL" ss -Hlnu 'sport = :4433')" ] || { tail "$tmp/cloud-endpoint-$net.log" >&2; die "cloud-endpoint did not start"; }
  fi
}

run_net() { # NET DIRTY-LIST
  local net=$1 dirty run
  start_endpoint "$net"
  for dirty in $2; do
    for run in $(seq "$LIVE_BENCH_RUNS"); do
      direct_case "$net" "$dirty" "$run"
      gateway_case "$net" "$dirty" "$run"
    done
  done
  stop_endpoint
}

: >"$tmp/cases.jsonl"
link_info='{}'
if [ "$LIVE_BENCH_LO" = 1 ] && [ -n "$LIVE_BENCH_LO_DIRTY" ]; then
  log "loopback: guests dirty=${LIVE_BENCH_LO_DIRTY// /,}, $LIVE_BENCH_RUNS run(s) each"
  run_net lo "$LIVE_BENCH_LO_DIRTY"
fi
if [ "$LIVE_BENCH_WAN" = 1 ] && [ -n "$LIVE_BENCH_WAN_DIRTY" ]; then
  [ -x "$WAN_RELAY" ] || die "no $WAN_RELAY (cargo build --release -p e2e --bin wan-relay)"
  wenv=(RATE="$LIVE_BENCH_RATE" DELAY_MS="$LIVE_BENCH_DELAY_MS" LOSS=0)
  [ -n "$LIVE_BENCH_UDP_MEM_MAX" ] && wenv+=(UDP_MEM_MAX="$LIVE_BENCH_UDP_MEM_MAX")
  env "${wenv[@]}" "$wan" up
  link_up=1
  ip netns exec "$ON" sleep 1000000 &
  ns_holder_on=$!
  ip netns exec "$CL" sleep 1000000 &
  ns_holder_cl=$!
  sleep 0.3
  rtt=$(ip netns exec "$ON" ping -n -q -c 5 -i 0.2 10.77.2.2 | sed -n 's|.* = \([0-9.]*\)/\([0-9.]*\)/.*|\2|p')
  cc=$(ip netns exec "$ON" sysctl -n net.ipv4.tcp_congestion_control)
  link_info=$(jq -nc --arg rate "$LIVE_BENCH_RATE" --arg d "$LIVE_BENCH_DELAY_MS" --arg rtt "$rtt" --arg cc "$cc" \
    '{rate: $rate, one_way_delay_ms: ($d | tonumber), idle_rtt_ms: ($rtt | tonumber? // null), tcp_cc_direct: $cc}')
  log "WAN up: $LIVE_BENCH_RATE, ${LIVE_BENCH_DELAY_MS} ms each way, idle RTT $rtt ms, TCP $cc (direct); guests dirty=${LIVE_BENCH_WAN_DIRTY// /,}"
  run_net wan "$LIVE_BENCH_WAN_DIRTY"
  "$wan" status >"$tmp/wan-status.txt" 2>&1 || true
  "$wan" down
  link_up=''
  relays=$(cat "/run/wan-$WAN_PREFIX.relay-up.last.log" "/run/wan-$WAN_PREFIX.relay-down.last.log" 2>/dev/null | grep ' exit: ' || true)
  link_info=$(jq -c --arg r "$relays" '. + {relays: ($r | split("\n") | map(select(length > 0)))}' <<<"$link_info")
fi

# --- aggregate, print, save ---------------------------------------------------------------
results=$LIVE_BENCH_DIR/results.json
jq -n --slurpfile cases "$tmp/cases.jsonl" --argjson link "$link_info" --arg runs "$LIVE_BENCH_RUNS" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" \
  --arg qemu "$(qemu-system-x86_64 --version | head -n1)" --arg load "$(cut -d' ' -f1-3 /proc/loadavg)" \
  --arg streams "${LIVE_BENCH_TUNNEL_STREAMS:-auto}" '
  def median: sort | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
                     else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def med(f): [.[] | select(.ok) | f | select(. != null)] | median;
  def ratio(a; b): if a == null or b == null or b == 0 then null else a / b end;
  def rate: if (.memory_ms // 0) > 0 and .ram_transferred != null then .ram_transferred / .memory_ms * 1000 else null end;
  {date: (now | todate), git: $rev, tunnel_streams: $streams, qemu: $qemu, load_at_end: $load, runs: ($runs | tonumber), wan: $link,
   cases: $cases,
   rows: ($cases | group_by([.net, .dirty]) | map(
     . as $g | ($g | map(select(.mode == "direct"))) as $d | ($g | map(select(.mode == "gateway"))) as $w |
     {net: $g[0].net, dirty: $g[0].dirty,
      direct: {ok: ($d | map(select(.ok)) | length), of: ($d | length), total_s: ($d | med(.total_s)), downtime_ms: ($d | med(.downtime_ms)),
               pause_ms: ($d | med(.console.pause_est_ms)),
               memory_ms: ($d | med(.memory_ms)), memory_rate: ($d | med(rate)), wire: ($d | med(.wire)), ram: ($d | med(.ram_transferred))},
      gateway: {ok: ($w | map(select(.ok)) | length), of: ($w | length), total_s: ($w | med(.total_s)), downtime_ms: ($w | med(.downtime_ms)),
                pause_ms: ($w | med(.console.pause_est_ms)),
                memory_ms: ($w | med(.memory_ms)), memory_rate: ($w | med(rate)), wire: ($w | med(.wire)), wire_all: ($w | med(.wire_all)), ram: ($w | med(.ram_transferred)),
                tunnel_plain: ($w | med(.tunnel_plain_bytes)), tunnel_wire: ($w | med(.tunnel_wire_bytes))}}
     | . + {ratio: {total: ratio(.gateway.total_s; .direct.total_s), downtime: ratio(.gateway.downtime_ms; .direct.downtime_ms),
                    pause: ratio(.gateway.pause_ms; .direct.pause_ms),
                    memory: ratio(.gateway.memory_ms; .direct.memory_ms), wire: ratio(.gateway.wire; .direct.wire),
                    memory_rate: ratio(.gateway.memory_rate; .direct.memory_rate)}}
     | . + {target: (if .net == "lo" then {what: "downtime <= 1.2x direct", met: (if .ratio.downtime then .ratio.downtime <= 1.2 else null end)}
                     else {what: "total <= direct", met: (if .ratio.total then .ratio.total <= 1 else null end)} end)}))}' >"$results"
cp "$results" "$tmp/results.json"

echo
echo "Live migration, direct (QEMU to QEMU over TCP) vs through the gateway: $(jq -r '"\(.qemu), git \(.git), \(.runs) run(s) per case (medians), streams per tunnel \(.tunnel_streams), load average at the end \(.load_at_end)"' "$results")"
jq -r 'if .wan.rate then "WAN: \(.wan.rate), \(.wan.one_way_delay_ms) ms each way (idle ping RTT \(.wan.idle_rtt_ms) ms), no loss; direct TCP congestion control \(.wan.tcp_cc_direct)" else empty end' "$results"
echo
echo "| link | guest | mode | ok | total s | downtime ms (QEMU) | console gap ms | memory ms | RAM MB | memory MB/s | wire MB | gw/direct total | gw/direct downtime | gw/direct wire | gw/direct memory rate | target |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
jq -r '
  def f(n): if . == null then "-" else (. * n | round / n | tostring) end;
  def mb: if . == null then "-" else (. / 1e6 * 10 | round / 10 | tostring) end;
  .rows[] | . as $r |
  (["direct", "gateway"][] as $m | $r[$m] as $x |
   "| \(if $r.net == "lo" then "loopback" else "WAN" end) | \(if $r.dirty == 0 then "idle" else "dirty=\($r.dirty)" end) | \($m) | \($x.ok)/\($x.of) | \($x.total_s | f(100)) | \($x.downtime_ms | f(1)) | \($x.pause_ms | f(1)) | \($x.memory_ms | f(1)) | \($x.ram | mb) | \($x.memory_rate | mb) | \($x.wire | mb) | " +
   (if $m == "gateway" then "\($r.ratio.total | f(100))x | \($r.ratio.downtime | f(100))x | \($r.ratio.wire | f(100))x | \($r.ratio.memory_rate | f(100))x | \($r.target.what): \(if $r.target.met == null then "n/a" elif $r.target.met then "met" else "MISSED" end) |"
    else "| | | | |" end))' "$results"
echo
echo "Per run (exact figures):"
jq -r '.cases[] | "  \(.net) dirty=\(.dirty) run \(.run) \(.mode): ok=\(.ok) total_s=\(.total_s) downtime_ms=\(.downtime_ms) memory_ms=\(.memory_ms) passes=\(.passes) ram_transferred=\(.ram_transferred) mirror_bytes=\(.mirror_bytes) wire=\(.wire) (up \(.wire_up), down \(.wire_down)) wire_all=\(.wire_all) console=\(.console | tojson)\(if .mode == "gateway" then " tunnel_plain=\(.tunnel_plain_bytes) tunnel_wire=\(.tunnel_wire_bytes)" else " guest_pause_ms=\(.guest_pause_ms | if . then round else . end) dirty_rate_mib_s=\(.dirty_rate_mib_s)" end) counter \(.counter.src_last)->\(.counter.dst_first)..\(.counter.dst_last)\(if (.problems | length) > 0 then " PROBLEMS: \(.problems | join("; "))" else "" end)"' "$results"
echo
echo "wire: bytes on the wire in both directions during the migration (WAN: Ethernet frames into each end's"
echo "wan0; loopback: IP bytes of the flows on lo, GSO packets unsegmented); gateway: Ready -> summary"
echo "(wire_all adds the handshake, the kernel+initrd upload and, on loopback, the link test)."
echo "total: direct blockdev-add -> destination cont; gateway Ready -> Committed. downtime: QEMU's figure."
echo "console gap: first destination counter - last source counter - the loop's median interval"
echo "(tests/live/console-gap.py), the same for both halves; it includes the bytes still in flight when QEMU"
echo "reports completion, but on loopback it also reads ~0.4 s above the STOP->RESUME pause (the guest's loop"
echo "after a resume), so compare it between the halves, not with QEMU's downtime."
echo "results: $results"
