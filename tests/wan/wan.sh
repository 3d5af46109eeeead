#!/usr/bin/env bash
# wan.sh - an emulated WAN link between two network namespaces, for rehearsing a lift.
#
#   <P>-onprem  [wan0 10.77.1.2] ==veth== [op 10.77.1.1]  <P>-router  [cl 10.77.2.1] ==veth== [wan0 10.77.2.2]  <P>-cloud
#
# The router namespace forwards between the two sides. Every forwarded packet goes to an
# NFQUEUE (0: onprem->cloud, 1: cloud->onprem) served by wan-relay (tests/src/bin/wan-relay.rs),
# which holds it for the one-way delay or drops it with the loss probability; released
# packets then meet a tbf rate limit (droptail queue) on the router's egress veth. The
# kernel segments GSO/TSO packets before they are queued, so TCP and QUIC/UDP see the same
# wire-sized packets. This needs no netem (this kind of kernel has none).
#
# usage (root):  wan.sh up | down | status | exec onprem|cloud|router CMD...
# env (defaults):
#   WAN_PREFIX=wan         namespace prefix: <P>-onprem, <P>-router, <P>-cloud; runs with different
#                          prefixes never collide (the addresses live inside the namespaces)
#   DELAY_MS=25            one-way delay, ms (RTT = 2 x DELAY_MS); DELAY_UP_MS / DELAY_DOWN_MS per direction
#   LOSS=0                 per-packet loss probability (0.01 = 1 %); LOSS_UP / LOSS_DOWN per direction
#   RATE=100mbit           bottleneck rate (tc syntax: 100mbit, 1gbit, 20mbit, or "none"); RATE_UP / RATE_DOWN
#   QUEUE_BYTES=auto       bottleneck buffer per direction; auto = 1 BDP (rate x RTT), at least 64 KB
#   BURST=auto             tbf bucket; auto = 2 ms at the rate, at least 64 KB
#   MTU=1500
#   TCP_MEM_MAX=67108864   max of tcp_rmem/tcp_wmem inside onprem and cloud (namespaced sysctls)
#   UDP_MEM_MAX=           if set, raise net.core.rmem_max/wmem_max (global, host-wide!) to at least
#                          this while the link is up (QUIC socket buffers); restored by `down`
#   SEED=1                 loss generator seed (onprem->cloud uses SEED, the other direction SEED+1)
#   RELAY_STATS_SECS=10    relay stats line interval (in $WAN_STATE/relay-{up,down}.log)
#   RELAY_RT=1             run the relay SCHED_FIFO (chrt -f 10), so busy CPUs do not smear the delay
#   WAN_RELAY=<repo>/target/release/wan-relay   built with `cargo build --release -p e2e --bin wan-relay`
#                          if missing
#   WAN_STATE=/run/wan-<P> logs and pids
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
P=${WAN_PREFIX:-wan}
ON=$P-onprem RT=$P-router CL=$P-cloud
STATE=${WAN_STATE:-/run/wan-$P}
DELAY_MS=${DELAY_MS:-25} LOSS=${LOSS:-0} RATE=${RATE:-100mbit}
DELAY_UP_MS=${DELAY_UP_MS:-$DELAY_MS} DELAY_DOWN_MS=${DELAY_DOWN_MS:-$DELAY_MS}
LOSS_UP=${LOSS_UP:-$LOSS} LOSS_DOWN=${LOSS_DOWN:-$LOSS}
RATE_UP=${RATE_UP:-$RATE} RATE_DOWN=${RATE_DOWN:-$RATE}
QUEUE_BYTES=${QUEUE_BYTES:-auto} BURST=${BURST:-auto} MTU=${MTU:-1500}
TCP_MEM_MAX=${TCP_MEM_MAX:-67108864}
SEED=${SEED:-1} RELAY_STATS_SECS=${RELAY_STATS_SECS:-10} RELAY_RT=${RELAY_RT:-1}
WAN_RELAY=${WAN_RELAY:-$REPO/target/release/wan-relay}

say() { echo "wan.sh: $*" >&2; }
die() { say "$*"; exit 1; }
nsx() { local n=$1; shift; ip netns exec "$n" "$@"; }
ns_exists() { [ -e "/run/netns/$1" ]; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, veth, tc, iptables); try: sudo $0 $*"
}

# Installs what is missing (Debian/Ubuntu): ip/tc (iproute2), iptables, ping.
need_tools() {
  local pkgs=()
  command -v ip >/dev/null && command -v tc >/dev/null || pkgs+=(iproute2)
  command -v iptables >/dev/null || pkgs+=(iptables)
  command -v ping >/dev/null || pkgs+=(iputils-ping)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${pkgs[*]}; install them"
  say "installing ${pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null \
    || die "apt-get install ${pkgs[*]} failed"
}

need_relay() {
  [ -x "$WAN_RELAY" ] && return 0
  command -v cargo >/dev/null || die "no relay at $WAN_RELAY and no cargo to build it"
  say "building wan-relay (cargo build --release -p e2e --bin wan-relay)"
  (cd "$REPO" && cargo build --release --quiet -p e2e --bin wan-relay) || die "building wan-relay failed"
  [ -x "$WAN_RELAY" ] || die "no relay at $WAN_RELAY after the build (set WAN_RELAY)"
}

# tc rate -> bytes per second
rate_Bps() {
  awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u); m = 1
    if (u ~ /^k/) m = 1e3; else if (u ~ /^m/) m = 1e6; else if (u ~ /^g/) m = 1e9
    if (u ~ /bps$/) m *= 8;   # tc: "bps" means bytes per second
    printf "%d", n * m / 8 }'
}
queue_bytes() { # rate
  if [ "$QUEUE_BYTES" != auto ]; then echo "$QUEUE_BYTES"; return; fi
  awk -v b="$(rate_Bps "$1")" -v rtt="$((DELAY_UP_MS + DELAY_DOWN_MS))" \
    'BEGIN { q = b * rtt / 1000; if (q < 65536) q = 65536; printf "%d", q }'
}
burst_bytes() { # rate
  if [ "$BURST" != auto ]; then echo "$BURST"; return; fi
  awk -v b="$(rate_Bps "$1")" 'BEGIN { q = b * 0.002; if (q < 65536) q = 65536; printf "%d", q }'
}
shape() { # dev rate
  [ "$2" = none ] && return 0
  nsx "$RT" tc qdisc replace dev "$1" root tbf rate "$2" burst "$(burst_bytes "$2")" limit "$(queue_bytes "$2")"
}

start_relay() { # name queue delay loss seed
  local rt=()
  [ "$RELAY_RT" = 1 ] && command -v chrt >/dev/null && rt=(chrt -f 10)
  # ip netns exec and chrt both exec, so $! is the relay itself.
  ip netns exec "$RT" "${rt[@]}" "$WAN_RELAY" --queue "$2" --delay-ms "$3" --loss "$4" --seed "$5" \
    --stats-secs "$RELAY_STATS_SECS" >>"$STATE/relay-$1.log" 2>&1 &
  echo $! >"$STATE/relay-$1.pid"
}

up() {
  need_root up
  need_tools
  need_relay
  # A previous run that crashed (or `up` twice) leaves namespaces behind: start clean.
  if ns_exists "$ON" || ns_exists "$RT" || ns_exists "$CL" || [ -d "$STATE" ]; then
    say "cleaning up an earlier link with prefix $P"
    down
  fi
  mkdir -p "$STATE"
  # Whatever fails from here on (set -e or die), leave nothing behind.
  trap 'rc=$?; if [ $rc -ne 0 ]; then say "up failed; tearing down"; down; fi; exit $rc' EXIT
  local n
  for n in "$ON" "$RT" "$CL"; do ip netns add "$n"; nsx "$n" ip link set lo up; done
  # Created directly inside the namespaces: no name is ever taken in the host namespace.
  ip link add wan0 netns "$ON" mtu "$MTU" type veth peer name op netns "$RT" mtu "$MTU"
  ip link add wan0 netns "$CL" mtu "$MTU" type veth peer name cl netns "$RT" mtu "$MTU"
  nsx "$ON" ip addr add 10.77.1.2/24 dev wan0
  nsx "$RT" ip addr add 10.77.1.1/24 dev op
  nsx "$RT" ip addr add 10.77.2.1/24 dev cl
  nsx "$CL" ip addr add 10.77.2.2/24 dev wan0
  nsx "$ON" ip link set wan0 up
  nsx "$CL" ip link set wan0 up
  nsx "$RT" ip link set op up
  nsx "$RT" ip link set cl up
  nsx "$ON" ip route add default via 10.77.1.1
  nsx "$CL" ip route add default via 10.77.2.1
  nsx "$RT" sysctl -qw net.ipv4.ip_forward=1
  # Nothing may bypass the relay: no IPv6 forwarding (IPv6 is not emulated).
  nsx "$RT" sysctl -qw net.ipv6.conf.all.forwarding=0
  for n in "$ON" "$CL"; do
    nsx "$n" sysctl -qw net.ipv4.tcp_rmem="4096 131072 $TCP_MEM_MAX" net.ipv4.tcp_wmem="4096 16384 $TCP_MEM_MAX"
    nsx "$n" sysctl -qw net.ipv4.tcp_no_metrics_save=1
  done
  # net.core.{r,w}mem_max are global (read-only inside a namespace): raise only if asked.
  if [ -n "${UDP_MEM_MAX:-}" ]; then
    local k cur
    for k in rmem_max wmem_max; do
      cur=$(sysctl -n net.core.$k)
      if [ "$cur" -lt "$UDP_MEM_MAX" ]; then
        echo "$k $cur $UDP_MEM_MAX" >>"$STATE/sysctl-restore"
        sysctl -qw net.core.$k="$UDP_MEM_MAX"
      fi
    done
  fi
  shape cl "$RATE_UP"
  shape op "$RATE_DOWN"
  # The relays first, then the rules: a queue without a listener drops (fails closed).
  start_relay up 0 "$DELAY_UP_MS" "$LOSS_UP" "$SEED"
  start_relay down 1 "$DELAY_DOWN_MS" "$LOSS_DOWN" "$((SEED + 1))"
  local ok=''
  for _ in $(seq 100); do
    if [ "$(nsx "$RT" awk '$1 == 0 || $1 == 1' /proc/net/netfilter/nfnetlink_queue 2>/dev/null | wc -l)" = 2 ]; then
      ok=1; break
    fi
    for n in up down; do
      kill -0 "$(cat "$STATE/relay-$n.pid")" 2>/dev/null || { cat "$STATE/relay-$n.log" >&2; die "wan-relay ($n) exited"; }
    done
    sleep 0.05
  done
  [ -n "$ok" ] || die "wan-relay did not bind its queues"
  nsx "$RT" iptables -w -t mangle -A FORWARD -i op -o cl -j NFQUEUE --queue-num 0
  nsx "$RT" iptables -w -t mangle -A FORWARD -i cl -o op -j NFQUEUE --queue-num 1
  nsx "$ON" ping -c 1 -W 5 -q 10.77.2.2 >/dev/null || die "no connectivity onprem -> cloud"
  trap - EXIT
  echo "$DELAY_UP_MS $DELAY_DOWN_MS $LOSS_UP $LOSS_DOWN $RATE_UP $RATE_DOWN" >"$STATE/params"
  say "up: onprem 10.77.1.2 ($ON) <-> cloud 10.77.2.2 ($CL): delay ${DELAY_UP_MS}/${DELAY_DOWN_MS} ms," \
      "loss ${LOSS_UP}/${LOSS_DOWN}, rate ${RATE_UP}/${RATE_DOWN}, queue $(queue_bytes "$RATE_UP") B; logs in $STATE"
}

down() {
  need_root down
  local n pid pids=''
  # Everything running in our namespaces: relays, servers, clients. TERM first (the relays
  # print their exit stats), then KILL what is left.
  for n in "$ON" "$RT" "$CL"; do
    ns_exists "$n" && pids="$pids $(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')"
  done
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do
    local alive=''
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  for n in "$ON" "$RT" "$CL"; do
    ns_exists "$n" && { ip netns del "$n" 2>/dev/null || say "could not delete namespace $n"; }
  done
  if [ -f "$STATE/sysctl-restore" ]; then
    local k old set
    while read -r k old set; do
      # Only if nobody changed it since.
      [ "$(sysctl -n net.core.$k)" = "$set" ] && sysctl -qw net.core.$k="$old"
    done <"$STATE/sysctl-restore"
  fi
  # Keep the relay logs (the last stats) next to the state dir for a post-mortem.
  if [ -d "$STATE" ]; then
    for n in up down; do [ -f "$STATE/relay-$n.log" ] && cp "$STATE/relay-$n.log" "$STATE.relay-$n.last.log"; done
    rm -rf "$STATE"
  fi
  return 0
}

status() {
  need_root status
  ns_exists "$RT" || { echo "down (no namespace $RT)"; return 3; }
  [ -f "$STATE/params" ] && read -r du dd lu ld ru rd <"$STATE/params" &&
    echo "link $P: delay $du/$dd ms, loss $lu/$ld, rate $ru/$rd (onprem->cloud / cloud->onprem)"
  echo "# bottleneck onprem->cloud (router dev cl), cloud->onprem (router dev op)"
  nsx "$RT" tc -s qdisc show dev cl
  nsx "$RT" tc -s qdisc show dev op
  echo "# NFQUEUE: queue portid waiting copy_mode copy_range queue_dropped user_dropped last_id 1"
  nsx "$RT" cat /proc/net/netfilter/nfnetlink_queue
  echo "# relays (the last stats lines)"
  local n
  for n in up down; do tail -n 1 "$STATE/relay-$n.log" 2>/dev/null || true; done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  exec)
    [ $# -ge 3 ] || die "usage: $0 exec onprem|cloud|router CMD..."
    need_root exec
    case $2 in onprem) n=$ON ;; cloud) n=$CL ;; router) n=$RT ;; *) die "no namespace '$2' (onprem, cloud, router)" ;; esac
    ns_exists "$n" || die "namespace $n does not exist; run: $0 up"
    shift 2
    exec ip netns exec "$n" "$@"
    ;;
  *) sed -n '2,31p' "$0" >&2; exit 2 ;;
esac
