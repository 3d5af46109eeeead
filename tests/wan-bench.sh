#!/usr/bin/env bash
# WAN benchmark: a gateway lift (edge-agent -> cloud-endpoint, QUIC + mTLS + zstd) of the
# realistic 1 GiB sample disk over an emulated WAN link (tests/wan/wan.sh), against what a
# user would otherwise do over the same link: scp, rsync over ssh, and rsync with
# compression, each with TCP congestion control bbr and cubic (set in the on-prem
# namespace, the sender's).
#
# Usage (as root, from anywhere):   tests/wan-bench.sh
#   BENCH_DIR=/tmp/gateway-bench   cache of sample images (shared with tests/bench.sh) and
#                                  wan-results.json
#   BENCH_SIZE=1G                  sample disk size; e.g. 256M for a quick run
#   BENCH_RATES="100mbit"          link rates of the full matrix (tc syntax)
#   BENCH_DELAY_MS=75              one-way delay (RTT = 2x)
#   BENCH_LOSSES="0 0.001 0.01"    per-packet loss probabilities of the full matrix
#   BENCH_TOOLS="scp rsync rsync-z" baselines (the lift always runs)
#   BENCH_CCS="bbr cubic"          TCP congestion controls for the baselines
#   BENCH_TIMEOUT=60               seconds a baseline may run; cut ones are reported by the
#                                  bytes that arrived
#   BENCH_LIFT_TIMEOUT=900         seconds the lift may run (it should finish: its copy is
#                                  checked with qemu-img compare)
#   BENCH_FAST_RATE=500mbit        one more link at this rate, loss 0: lift and rsync-z bbr
#                                  only, to show the emulator's limits ("none" skips it)
#   BENCH_UDP_MEM_MAX=8388608      raise net.core.rmem_max/wmem_max (host-wide) to this while a
#                                  link is up, so the QUIC sockets get the 8 MiB they ask
#                                  for (TCP gets 64 MiB inside the namespaces); "" keeps them
#   BENCH_BUILD=1                  cargo build --release --workspace first (0: use target/)
#   BENCH_BIN=target/release       where the binaries are (a copy, to measure one build while
#                                  another compiles)
#   BENCH_MODE=baselines           "forecast": no baselines; per link of BENCH_FORECAST_LINKS,
#                                  `edge-agent link-test --vm` then the real lift right after,
#                                  and the forecast's error against the lift's wall time
#   BENCH_FORECAST_LINKS="20mbit:0 100mbit:0 100mbit:0.01"   rate:loss of each forecast case
#   BENCH_LINKTEST_SECS=5          link-test --seconds in forecast mode
#   BENCH_KEEP=1                   keep the run's temp dir (logs, copies)
#
# Per case: wall time, logical rate (MB/s of the image), the link's use (bytes that
# arrived at the cloud side's interface, headers and retransmissions included, as a share
# of rate x wall), for the lift its payload and wire bytes (the --json summary), and the
# lift's logical rate over each baseline's.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
wan=$root/tests/wan/wan.sh
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_RATES=${BENCH_RATES:-100mbit}
BENCH_DELAY_MS=${BENCH_DELAY_MS:-75}
BENCH_LOSSES=${BENCH_LOSSES:-0 0.001 0.01}
BENCH_TOOLS=${BENCH_TOOLS:-scp rsync rsync-z}
BENCH_CCS=${BENCH_CCS:-bbr cubic}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
BENCH_LIFT_TIMEOUT=${BENCH_LIFT_TIMEOUT:-900}
BENCH_FAST_RATE=${BENCH_FAST_RATE:-500mbit}
BENCH_UDP_MEM_MAX=${BENCH_UDP_MEM_MAX-8388608}
BENCH_MODE=${BENCH_MODE:-baselines}
BENCH_FORECAST_LINKS=${BENCH_FORECAST_LINKS:-20mbit:0 100mbit:0 100mbit:0.01}
BENCH_LINKTEST_SECS=${BENCH_LINKTEST_SECS:-5}
log() { printf '[wan-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, tc, iptables, sshd, apt-get)"
[[ $BENCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "BENCH_SIZE=$BENCH_SIZE is not like 1G or 256M"
[[ $BENCH_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "BENCH_TIMEOUT=$BENCH_TIMEOUT is not a number of seconds"
case $BENCH_MODE in baselines|forecast) ;; *) die "BENCH_MODE=$BENCH_MODE: use baselines or forecast" ;; esac

# --- tools (install only what is missing; wan.sh installs iptables/iproute2 itself) ------
need_pkgs=()
[ -x /usr/bin/time ] || need_pkgs+=(time)
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v ssh >/dev/null || need_pkgs+=(openssh-client)
command -v rsync >/dev/null || need_pkgs+=(rsync)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v iptables >/dev/null || need_pkgs+=(iptables)
command -v ping >/dev/null || need_pkgs+=(iputils-ping)
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# rsync's compression: zstd when this rsync has it (3.2+), else zlib (plain -z).
if rsync --version | grep -A1 -i '^Compress list' | grep -qw zstd; then
  rsync_z=(--compress --compress-choice=zstd); rsync_z_name="rsync -z (zstd)"
else
  rsync_z=(--compress); rsync_z_name="rsync -z (zlib)"
fi
# bbr: a module on many kernels.
if ! grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control; then
  modprobe tcp_bbr 2>/dev/null || true
  grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control \
    || { log "no bbr on this kernel: baselines with cubic only"; BENCH_CCS=${BENCH_CCS//bbr/}; }
fi

# net.ipv4.tcp_congestion_control is per namespace, but a namespace other than the host's
# may only pick an algorithm of net.ipv4.tcp_allowed_congestion_control (host-wide; "reno
# bbr" on this kind of machine): add the ones we compare while the benchmark runs.
allowed_before=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
allowed_set=''
allow_ccs() {
  local want=$allowed_before cc
  for cc in $BENCH_CCS; do grep -qw "$cc" <<<"$want" || want="$want $cc"; done
  if [ "$want" != "$allowed_before" ]; then
    sysctl -qw net.ipv4.tcp_allowed_congestion_control="$want" && allowed_set=$want
    log "tcp_allowed_congestion_control: '$allowed_before' -> '$want' (restored at exit)"
  fi
}
restore_ccs() {
  [ -n "$allowed_set" ] && [ "$(sysctl -n net.ipv4.tcp_allowed_congestion_control)" = "$allowed_set" ] \
    && sysctl -qw net.ipv4.tcp_allowed_congestion_control="$allowed_before"
  allowed_set=''
}

# --- build, sample disk ---------------------------------------------------------------
if [ "${BENCH_BUILD:-1}" = 1 ]; then
  log "cargo build --release --workspace"
  (cd "$root" && cargo build --release --workspace --quiet)
fi
bin=${BENCH_BIN:-$root/target/release}
for b in edge-agent cloud-endpoint certs wan-relay; do [ -x "$bin/$b" ] || die "no $bin/$b (cargo build --release --workspace)"; done

mkdir -p "$BENCH_DIR"
if [ "$BENCH_SIZE" = 1G ]; then img=$BENCH_DIR/sample-disk.img; else img=$BENCH_DIR/sample-disk-$BENCH_SIZE.img; fi
if [ ! -s "$img" ]; then
  mode=full; [ "$(numfmt --from=iec "$BENCH_SIZE")" -lt $((1 << 30)) ] && mode=small
  log "making $img ($BENCH_SIZE, $mode file set; takes about a minute)"
  bash "$root/tests/sample-disk.sh" "$img.part" "$BENCH_SIZE" "$mode"
  mv "$img.part" "$img"
fi
size=$(stat -c %s "$img")
cat "$img" >/dev/null # every tool reads it from the page cache: the link is the subject

# --- temp dir, link, cleanup ----------------------------------------------------------
tmp=$(mktemp -d "$BENCH_DIR/wan-run.XXXXXX")
export WAN_PREFIX=wb$$ WAN_RELAY=$bin/wan-relay RELAY_STATS_SECS=5
link_up=''
link_down() { if [ -n "$link_up" ]; then "$wan" down || true; link_up=''; fi; }
cleanup() {
  local rc=$?
  link_down
  restore_ccs
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# tc rate -> bit/s
rate_bps() {
  awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u); m = 1
    if (u ~ /^k/) m = 1e3; else if (u ~ /^m/) m = 1e6; else if (u ~ /^g/) m = 1e9
    if (u ~ /bps$/) m *= 8; printf "%d", n * m }'
}
now() { date +%s.%N; }
cloud_rx() { "$wan" exec cloud cat /sys/class/net/wan0/statistics/rx_bytes; }

# --- PKI, VM, ssh keys (once) -----------------------------------------------------------
"$bin/certs" ca --out "$tmp/pki" >/dev/null
"$bin/certs" endpoint --ca "$tmp/pki" --out "$tmp/pki" --name 10.77.2.2 >/dev/null
"$bin/certs" edge --ca "$tmp/pki" --out "$tmp/pki" --name wan-bench-edge >/dev/null
mkdir -p "$tmp/vm" "$tmp/ssh" "$tmp/dst" /run/sshd
ln -s "$img" "$tmp/vm/sample-disk.img"
write_vmx "$tmp/vm/bench.vmx" wanbench sample-disk.img 00:50:56:aa:bb:cc
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/client_key"
cp "$tmp/ssh/client_key.pub" "$tmp/ssh/authorized_keys"
cat >"$tmp/ssh/sshd_config" <<EOF
Port 22
ListenAddress 10.77.2.2
HostKey $tmp/ssh/host_key
PidFile $tmp/ssh/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $tmp/ssh/authorized_keys
StrictModes no
UsePAM no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
/usr/sbin/sshd -t -f "$tmp/ssh/sshd_config" || die "sshd rejects its config"
ssh_o=(-i "$tmp/ssh/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
       -o BatchMode=yes -o LogLevel=ERROR)
ssh_cmd="ssh ${ssh_o[*]}"

# Starts a link and the two servers in its cloud namespace; sets rtt (idle ping, ms).
start_link() { # rate loss
  local env=(RATE="$1" DELAY_MS="$BENCH_DELAY_MS" LOSS="$2")
  [ -n "$BENCH_UDP_MEM_MAX" ] && env+=(UDP_MEM_MAX="$BENCH_UDP_MEM_MAX")
  env "${env[@]}" "$wan" up
  link_up=1
  "$wan" exec cloud /usr/sbin/sshd -f "$tmp/ssh/sshd_config"
  rm -rf "$tmp/datastore" "$tmp/inventory.db"
  "$wan" exec cloud env CLOUD_ENDPOINT_LISTEN=10.77.2.2:4433 CLOUD_ENDPOINT_API_LISTEN=off CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true \
    CLOUD_ENDPOINT_CERT="$tmp/pki/endpoint.pem" CLOUD_ENDPOINT_KEY="$tmp/pki/endpoint.key" \
    CLOUD_ENDPOINT_EDGE_CA="$tmp/pki/ca.pem" CLOUD_ENDPOINT_DATASTORE_DIR="$tmp/datastore" \
    CLOUD_ENDPOINT_DATABASE="$tmp/inventory.db" CLOUD_ENDPOINT_LOG=warn \
    "$bin/cloud-endpoint" serve >>"$tmp/cloud-endpoint.log" 2>&1 &
  for _ in $(seq 100); do
    [ -n "$("$wan" exec cloud ss -Hlnu 'sport = :4433')" ] && [ -n "$("$wan" exec cloud ss -Hlnt 'sport = :22')" ] && break
    sleep 0.1
  done
  [ -n "$("$wan" exec cloud ss -Hlnu 'sport = :4433')" ] || { tail "$tmp/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
  [ -n "$("$wan" exec cloud ss -Hlnt 'sport = :22')" ] || die "sshd did not start in the cloud namespace"
  rtt=$("$wan" exec onprem ping -n -q -c 5 -i 0.2 10.77.2.2 | sed -n 's|.* = \([0-9.]*\)/\([0-9.]*\)/.*|\2|p')
  log "link up: $1, ${BENCH_DELAY_MS} ms each way, loss $2, idle ping RTT ${rtt} ms"
}

# Records the emulator's own counters for the link, then takes it down.
stop_link() { # case-id
  local st relays
  st=$("$wan" status || true)
  link_down
  relays=$(cat "/run/wan-$WAN_PREFIX.relay-up.last.log" "/run/wan-$WAN_PREFIX.relay-down.last.log" 2>/dev/null | grep ' exit: ' || true)
  # NFQUEUE columns: queue portid waiting copy_mode copy_range queue_dropped user_dropped ...
  jq -nc --arg id "$1" --arg st "$st" --arg relays "$relays" '
    def kv: [scan("([a-z_0-9]+) ([0-9]+)") | {(.[0]): (.[1] | tonumber)}] | add;
    {link: $id,
     relays: ($relays | split("\n") | map(select(length > 0)) | map(capture("q(?<q>[0-9]+) exit: (?<rest>.*)") | {queue: (.q | tonumber)} + (.rest | kv))),
     nfqueue_drops: ($st | split("\n") | map(select(test("^ *[01] +[0-9]+ ")) | split(" ") | map(select(length > 0)))
                     | map({queue: (.[0] | tonumber), queue_dropped: (.[5] | tonumber), user_dropped: (.[6] | tonumber)})),
     tbf_dropped: [$st | scan("[(]dropped ([0-9]+),") | .[0] | tonumber]}' >>"$tmp/links.jsonl"
  log "emulator: $(tail -n1 "$tmp/links.jsonl" | jq -c '{late_max_us: [.relays[].late_max_total_us], late_over_1ms: [.relays[].late_over_1ms], nfqueue_drops, tbf_dropped}')"
}

# One case: writes a JSON line to cases.jsonl.
record() { # rate loss rtt tool cc wall arrived complete rx [extra-json]
  jq -nc --arg rate "$1" --argjson bps "$(rate_bps "$1")" --argjson loss "$2" --arg rtt "$3" --arg tool "$4" \
    --arg cc "$5" --argjson wall "$6" --argjson arrived "$7" --argjson complete "$8" --argjson rx "$9" \
    --argjson size "$size" --argjson extra "${10:-{\}}" '
    {rate: $rate, loss: $loss, idle_rtt_ms: ($rtt | tonumber? // null), tool: $tool, cc: $cc, wall_s: $wall,
     complete: $complete, logical_bytes: $arrived,
     logical_MBps: ($arrived / $wall / 1e6),
     link_rx_bytes: $rx, link_use: ($rx * 8 / $wall / $bps)} + $extra' >>"$tmp/cases.jsonl"
  log "$(tail -n1 "$tmp/cases.jsonl" | jq -r '"\(.tool) \(.cc): \(.wall_s*100|round/100) s, \(.logical_MBps*100|round/100) MB/s logical, link use \(.link_use*1000|round/10) %\(if .complete then "" else " (cut: \(.logical_bytes) B arrived)" end)"')"
}

lift() { # rate loss rtt
  lift_n=$((lift_n + 1))
  local name=wanbench-$lift_n rx0 t0 t1 rc=0 out=$tmp/lift.$lift_n.json
  rx0=$(cloud_rx); t0=$(now)
  # --no-dedup: the same disk is lifted again and again; each lift must cross the link.
  "$wan" exec onprem timeout "$BENCH_LIFT_TIMEOUT" "$bin/edge-agent" migrate --no-dedup --vmx "$tmp/vm/bench.vmx" \
    --url quic://10.77.2.2:4433 --user migrator@cloud.local --password 'VMware1!Cloud' \
    --ca-bundle "$tmp/pki/ca.pem" --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" \
    --name "$name" --link-rate "${lift_rate:-$1}" --link-rtt "$((2 * BENCH_DELAY_MS))ms" --receipt "$tmp/$name.receipt.json" \
    --json >"$out" 2>"$tmp/lift.$lift_n.log" || rc=$?
  t1=$(now)
  local wall rx summary
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'); rx=$(($(cloud_rx) - rx0))
  summary=$(grep '"event":"summary"' "$out" | tail -n1 || true)
  if [ "$rc" = 0 ] && [ -n "$summary" ]; then
    qemu-img compare "$img" "$tmp/datastore/$name/$name.vmdk" >"$tmp/compare.log" 2>&1 \
      || { cat "$tmp/compare.log" >&2; die "qemu-img compare: the lifted disk differs from the source"; }
    record "$1" "$2" "$3" lift quic "$wall" "$size" true "$rx" "$(jq -c --argjson wall "$wall" --argjson bps "$(rate_bps "$1")" \
      '{payload_bytes, wire_bytes, zero_bytes, resent_chunks, ratio, agent_duration_s: .duration_secs,
        wire_goodput_share: (.wire_bytes * 8 / $wall / $bps), payload_goodput_share: (.payload_bytes * 8 / $wall / $bps),
        verified: "qemu-img compare: identical"}' <<<"$summary")"
    rm -rf "${tmp:?}/datastore/$name" # keep the disk usage of a long run flat
  else
    [ "$rc" = 124 ] || { tail -n3 "$out" "$tmp/lift.$lift_n.log" >&2; log "lift failed (exit $rc)"; }
    local done_b
    done_b=$(grep '"event":"progress"' "$out" | tail -n1 | jq -r '.done_bytes // 0' 2>/dev/null || echo 0)
    record "$1" "$2" "$3" lift quic "$wall" "${done_b:-0}" false "$rx" "{\"exit\": $rc}"
  fi
}

baseline() { # rate loss rtt tool cc
  local dst=$tmp/dst/disk.img rx0 t0 t1 rc=0
  rm -f "$dst"
  "$wan" exec onprem sysctl -qw net.ipv4.tcp_congestion_control="$5"
  [ "$("$wan" exec onprem sysctl -n net.ipv4.tcp_congestion_control)" = "$5" ] || die "could not set $5 in the on-prem namespace"
  rx0=$(cloud_rx); t0=$(now)
  case $4 in
    scp) "$wan" exec onprem timeout "$BENCH_TIMEOUT" scp "${ssh_o[@]}" "$img" "root@10.77.2.2:$dst" \
           >"$tmp/base.log" 2>&1 || rc=$? ;;
    rsync) "$wan" exec onprem timeout "$BENCH_TIMEOUT" rsync --inplace -e "$ssh_cmd" "$img" "root@10.77.2.2:$dst" \
             >"$tmp/base.log" 2>&1 || rc=$? ;;
    rsync-z) "$wan" exec onprem timeout "$BENCH_TIMEOUT" rsync --inplace "${rsync_z[@]}" -e "$ssh_cmd" "$img" \
               "root@10.77.2.2:$dst" >"$tmp/base.log" 2>&1 || rc=$? ;;
    *) die "unknown tool $4" ;;
  esac
  t1=$(now)
  local wall arrived rx
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }'); rx=$(($(cloud_rx) - rx0))
  arrived=$(stat -c %s "$dst" 2>/dev/null || echo 0)
  if [ "$rc" = 0 ]; then
    [ "$arrived" = "$size" ] || die "$4 exited 0 but $arrived of $size bytes arrived"
    record "$1" "$2" "$3" "$4" "$5" "$wall" "$arrived" true "$rx"
  else
    [ "$rc" = 124 ] || { cat "$tmp/base.log" >&2; log "$4 failed (exit $rc)"; }
    record "$1" "$2" "$3" "$4" "$5" "$wall" "$arrived" false "$rx" "{\"exit\": $rc}"
  fi
  rm -f "$dst"
}

# --- forecast mode: link-test --vm against the lift that follows it ----------------------
# The forecast is what a user reads before a lift: `link-test --vm` on the same link, its
# `lift_secs` (transfer and fixed costs) against the wall time of `migrate` run right
# after with the figures link-test recommends (--link-rate from its measured rate).
forecast_case() { # rate loss
  local lt=$tmp/linktest.$((lift_n + 1)).json rc=0 forecast mbit
  "$wan" exec onprem "$bin/edge-agent" link-test --url quic://10.77.2.2:4433 \
    --ca-bundle "$tmp/pki/ca.pem" --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" \
    --seconds "$BENCH_LINKTEST_SECS" --vm "$tmp/vm/bench.vmx" --json >"$lt" 2>"$lt.log" || rc=$?
  [ "$rc" = 0 ] || { cat "$lt.log" >&2; die "link-test failed (exit $rc)"; }
  forecast=$(jq '.vm.estimate.lift_secs' "$lt")
  mbit=$(jq '.upload.steady_mbit_s | round' "$lt")
  log "link-test: $(jq -c '{rtt_min_ms: .rtt.min_ms, rtt_mean_ms: .rtt.mean_ms, streams, up_steady: .upload.steady_mbit_s, up_whole: .upload.mbit_s, live: .live_migration.pass, forecast_s: .vm.estimate.lift_secs, levels: .vm.estimate.zstd_levels, ratio: .vm.estimate.compression_ratio}' "$lt")"
  # The lift as link-test tells the user to run it.
  lift_rate=${mbit}mbit lift "$1" "$2" "$rtt"
  jq -c --slurpfile lt "$lt" --argjson forecast "$forecast" '
    select(.tool == "lift") | . + {forecast_s: $forecast,
      forecast_error: (if .complete then ($forecast - .wall_s) / .wall_s else null end),
      linktest: ($lt[0] | {rtt_min_ms: .rtt.min_ms, rtt_mean_ms: .rtt.mean_ms, streams,
        upload_steady_mbit_s: .upload.steady_mbit_s, upload_whole_mbit_s: .upload.mbit_s,
        upload_loss_percent: .upload.loss_percent, live_migration: .live_migration,
        estimate: (.vm.estimate | del(.level_curve))})}' <<<"$(tail -n1 "$tmp/cases.jsonl")" >>"$tmp/forecast.jsonl"
  log "$(tail -n1 "$tmp/forecast.jsonl" | jq -r '"forecast \(.forecast_s*10|round/10) s, lift \(.wall_s*10|round/10) s: error \(if .forecast_error then "\(.forecast_error*1000|round/10) %" else "-" end)"')"
}

if [ "$BENCH_MODE" = forecast ]; then
  lift_n=0
  log "image $img ($size B); forecast cases: $BENCH_FORECAST_LINKS"
  for case in $BENCH_FORECAST_LINKS; do
    start_link "${case%%:*}" "${case#*:}"
    forecast_case "${case%%:*}" "${case#*:}"
    stop_link "$case"
  done
  r=$BENCH_DIR/wan-forecast.json
  jq -n --slurpfile cases "$tmp/forecast.jsonl" --slurpfile links "$tmp/links.jsonl" --argjson size "$size" \
    --arg image "$img" --arg delay "$BENCH_DELAY_MS" \
    --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
    {date: (now | todate), git: $rev, image: $image, logical_bytes: $size, one_way_delay_ms: ($delay | tonumber),
     cores: '"$(nproc)"', cases: $cases, emulator: $links}' >"$r"
  echo
  echo "link-test --vm forecast vs the lift: $(jq -r '"\(.logical_bytes) B image (\(.image)), \(.one_way_delay_ms) ms each way, git \(.git)"' "$r")"
  echo
  echo "| rate | loss | RTT min/mean ms | streams | probe Mbit/s (whole phase) | zstd level / ratio forecast | ratio real | forecast s | lift s | error |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  jq -r '.cases[] | "| \(.rate) | \(.loss * 100)% | \(.linktest.rtt_min_ms * 10 | round / 10) / \(.linktest.rtt_mean_ms * 10 | round / 10) | \(.linktest.streams) | \(.linktest.upload_steady_mbit_s * 10 | round / 10) (\(.linktest.upload_whole_mbit_s * 10 | round / 10)) | \(.linktest.estimate.zstd_final_level) / \(.linktest.estimate.compression_ratio * 100 | round / 100) | \(if .complete then (.logical_bytes - .zero_bytes) / .payload_bytes * 100 | round / 100 else "-" end) | \(.forecast_s * 10 | round / 10) | \(.wall_s * 10 | round / 10)\(if .complete then "" else " (cut)" end) | \(if .forecast_error then "\(.forecast_error * 1000 | round / 10) %" else "-" end) |"' "$r"
  echo
  jq -r '.cases[] | "\(.rate) loss \(.loss * 100)%: live migration class \(if .linktest.live_migration.pass then "PASS" else "FAIL" end): \(.linktest.live_migration.reasons | join(", ")); forecast transfer \(.linktest.estimate.transfer_secs * 10 | round / 10) s + fixed \(.linktest.estimate.fixed.total_secs * 10 | round / 10) s; lift payload \(.payload_bytes) B vs forecast \(.linktest.estimate.payload_bytes) B"' "$r"
  echo "results: $r"
  exit 0
fi

host_cc=$(sysctl -n net.ipv4.tcp_congestion_control)
allow_ccs
lift_n=0
log "image $img ($size B); baselines cut at ${BENCH_TIMEOUT} s; rsync compression: $rsync_z_name"
for rate in $BENCH_RATES; do
  for loss in $BENCH_LOSSES; do
    start_link "$rate" "$loss"
    lift "$rate" "$loss" "$rtt"
    for tool in $BENCH_TOOLS; do
      for cc in $BENCH_CCS; do baseline "$rate" "$loss" "$rtt" "$tool" "$cc"; done
    done
    stop_link "$rate/$loss"
  done
done
if [ "$BENCH_FAST_RATE" != none ] && [ -n "$BENCH_FAST_RATE" ]; then
  start_link "$BENCH_FAST_RATE" 0
  lift "$BENCH_FAST_RATE" 0 "$rtt"
  grep -qw bbr <<<"$BENCH_CCS" && baseline "$BENCH_FAST_RATE" 0 "$rtt" rsync-z bbr
  stop_link "$BENCH_FAST_RATE/0"
fi
[ "$(sysctl -n net.ipv4.tcp_congestion_control)" = "$host_cc" ] || log "warning: the host's congestion control changed"

# --- aggregate, print, save -------------------------------------------------------------
r=$BENCH_DIR/wan-results.json
jq -n --slurpfile cases "$tmp/cases.jsonl" --slurpfile links "$tmp/links.jsonl" --argjson size "$size" \
  --arg image "$img" --arg delay "$BENCH_DELAY_MS" --arg timeout "$BENCH_TIMEOUT" --arg rz "$rsync_z_name" \
  --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
  {date: (now | todate), git: $rev, image: $image, logical_bytes: $size, one_way_delay_ms: ($delay | tonumber),
   baseline_timeout_s: ($timeout | tonumber), rsync_z: $rz, cores: '"$(nproc)"',
   cases: [$cases[] as $c
     | if $c.tool == "lift" then $c
       else ([$cases[] | select(.tool == "lift" and .rate == $c.rate and .loss == $c.loss) | .logical_MBps] | first) as $l
         | $c + {lift_over_this: (if $l == null or $c.logical_MBps == 0 then null else $l / $c.logical_MBps end)}
       end],
   emulator: $links}' >"$r"

echo
echo "WAN lift vs baselines: $(jq -r '"\(.logical_bytes) B image (\(.image)), \(.one_way_delay_ms) ms each way, baselines cut at \(.baseline_timeout_s) s, \(.rsync_z), git \(.git)"' "$r")"
echo
echo "| rate | loss | tool | TCP cc | wall s | logical MB/s | link use | lift / this |"
echo "|---|---|---|---|---|---|---|---|"
jq -r '.cases[] | "| \(.rate) | \(.loss * 100)% | \(.tool) | \(.cc) | \(.wall_s * 10 | round / 10)\(if .complete then "" else " (cut: \(.logical_bytes / 1048576 | round) MiB)" end) | \(.logical_MBps * 100 | round / 100) | \(.link_use * 100 | round)% | \(if .lift_over_this then "\(.lift_over_this * 100 | round / 100)x" else "-" end) |"' "$r"
echo
jq -r '.cases[] | select(.tool == "lift" and .complete) | "lift at \(.rate), loss \(.loss * 100)%: payload \(.payload_bytes) B, wire \(.wire_bytes) B (ratio \(.ratio * 100 | round / 100)), wire goodput \(.wire_goodput_share * 100 | round)% of the link, \(.resent_chunks) chunks resent; \(.verified)"' "$r"
echo
echo "emulator (relay lateness in us, drops the emulator itself made):"
jq -r '.emulator[] | "  \(.link): late_max_us \([.relays[].late_max_total_us]), releases >1 ms late \([.relays[].late_over_1ms]), relay loss-drops \([.relays[].dropped]), nfqueue drops \([.nfqueue_drops[] | .queue_dropped + .user_dropped]), tbf drops \(.tbf_dropped)"' "$r"
echo "results: $r"
