#!/usr/bin/env bash
# Where the compose deployment's cost against host processes goes: the same lift (the
# sample VM, --no-dedup) through several paths in alternating rounds, each with its own
# idle endpoint, the median wall as the edge times it (connection to commit) and the CPU
# seconds the edge and the endpoint used for it. deploy/bench.sh is the issue's own
# comparison (host processes against the compose deployment); this one takes it apart.
# docs/containers.md has the figures.
#
# Usage (root, after deploy/build-images.sh):
#   BENCH_MODES="host hostgrp netns bridge hostnet2 nosec" BENCH_ROUNDS=5 deploy/bench-paths.sh
# Modes:
#   host      endpoint and edge as host processes on loopback (deploy/bench.sh's host side)
#   hostgrp   the same, each process in a cpu cgroup of its own, as Docker puts each container
#   hostcg    the same in a cgroup of its own in each v1 controller Docker uses (cpu,
#             cpuacct, memory, cpuset, blkio, pids), under one parent per controller
#   netns     host processes in two network namespaces joined by a veth pair each and a
#             Linux bridge, as Docker's bridge network joins two containers; no container
#   bridge    the two images on a user-defined bridge network (what compose makes: MTU
#             1500, iptables through br_netfilter), the edge reaching the endpoint by name
#   hostnet2  the two images on the host's network (loopback): a container without the bridge
#   nosec     as bridge, both containers with --security-opt seccomp=unconfined
#   binmount  as bridge, each container running the host's binary (bind mount) instead of
#             the image's copy on Docker's storage driver (fuse-overlayfs on this machine)
#   shares    as bridge, both containers with --cpu-shares 8192
#   statevol  as bridge, the edge's state folder (its checkpoint, synced every second) on
#             a Docker volume, under /var/lib/docker on the host's disk, as compose's
#             edge-state volume puts it; every other mode keeps it in the run's folder
#             with the rest (BENCH_TMP), as the host processes do
#   hostpoll  as host, with what the script's first version did beside each container
#             lift: `docker inspect` of a running container and a read of a cgroup file
#             every 50 ms (against an idle container of its own); the cost of that polling
# Knobs:
#   GATEWAY_ENDPOINT_IMAGE, GATEWAY_EDGE_IMAGE   the images (default the :latest tags that
#                   deploy/build-images.sh makes); a warning if their revision is not HEAD's
#   BENCH_ROUNDS=3  BENCH_DISK=1G  BENCH_TMP=/dev/shm (sample, datastores, state: no disk
#   in the comparison)  BENCH_SAMPLE=FILE (a disk image to copy instead of making one)
#   BENCH_HOG=N     N busy loops in the root cgroup during the run: other work on the host
#   BENCH_DOCKER_SHARES=N  sets /sys/fs/cgroup/cpu/docker/cpu.shares (cgroup v1, Docker's
#                   cgroupfs driver: the parent of every container) for the run, restored after
#   BENCH_UDP_MEM_MAX=N  sets net.core.rmem_max and wmem_max for the run, restored after:
#                   the containers' uid 10001 cannot force larger UDP buffers past them, the
#                   host processes (root) can (gateway::transport asks for 9375000 bytes)
#   BENCH_PERF=DIR  records every CPU (perf record -a) during each lift into DIR/<mode><round>.data:
#                   `perf report -i FILE --sort comm` says which processes took the CPU
#   BENCH_WAN=1     puts the modes netns and bridge behind an emulated WAN link: tests/wan's
#                   wan-relay holds every packet to and from the endpoint's QUIC port for
#                   BENCH_WAN_DELAY_MS (75; each way) through NFQUEUE rules in the host's
#                   mangle FORWARD chain (br_netfilter hands bridged packets to iptables),
#                   and tbf limits both directions of the endpoint's veth pair to
#                   BENCH_WAN_RATE (100mbit; queue 1 BDP, burst 64 KB, as tests/wan/wan.sh).
#                   Both setups cross the same kind of link: the same relay, queues 1717/1718.
# Endpoint CPU: /proc (host processes) or the container's cpuacct.usage; edge CPU: the
# children's rusage (host processes) or its container's cpuacct.usage polled every 50 ms
# until it exits (the last poll may miss up to 50 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. "$root/tests/bench-lib.sh"
bin=${GATEWAY_BIN:-$root/target/release}
disk=${BENCH_DISK:-1G}
rounds=${BENCH_ROUNDS:-3}
modes=${BENCH_MODES:-host netns bridge}
say() { echo "deploy/bench-paths.sh: $*" >&2; }
# Other worktrees on a shared machine build the same :latest tags; a run compares the
# images against $bin, so it can take images tagged for it.
endpoint_image=${GATEWAY_ENDPOINT_IMAGE:-gateway/cloud-endpoint:latest}
edge_image=${GATEWAY_EDGE_IMAGE:-gateway/edge-agent:latest}
for i in "$endpoint_image" "$edge_image"; do
  r=$(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$i")
  [ "$r" = "$(git rev-parse --short HEAD)" ] || say "warning: $i was built at $r, this tree is at $(git rev-parse --short HEAD)"
done
[ "$(id -u)" = 0 ] || { say "needs root (network namespaces, cgroups, iptables)"; exit 2; }
work=$(mktemp -d "${BENCH_TMP:-/dev/shm}/gateway-paths.XXXXXX")
tag=gwpaths$$
net=$tag-cloud
ns_a=$tag-a ns_b=$tag-b br=${tag:0:8}br
pids=()
grp=/sys/fs/cgroup/cpu/$tag
cgs="cpu cpuacct memory cpuset blkio pids"
cleanup() {
  # The run's own status: the tests below of what there is to undo end false when there
  # is nothing, and an EXIT trap's last status would become the script's.
  local rc=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  docker rm -f -v $(docker ps -aq --filter "name=^$tag-") >/dev/null 2>&1 || true
  docker network rm "$net" >/dev/null 2>&1 || true
  ip netns del "$ns_a" 2>/dev/null || true; ip netns del "$ns_b" 2>/dev/null || true
  ip link del "$br" 2>/dev/null || true
  [ -n "${fwd:-}" ] && iptables -D FORWARD -i "$br" -o "$br" -j ACCEPT
  if [ -n "${wan_rules:-}" ]; then for ip in "${ep_ips[@]}"; do
    iptables -w -t mangle -D FORWARD -d "$ip" -p udp --dport 4433 -j NFQUEUE --queue-num 1717
    iptables -w -t mangle -D FORWARD -s "$ip" -p udp --sport 4433 -j NFQUEUE --queue-num 1718
  done; fi
  [ -n "${BENCH_KEEP_OUT:-}" ] && cp "$work"/relay-*.log "$BENCH_KEEP_OUT"/ 2>/dev/null
  rm -rf "$work"
  [ -n "${old_rmem:-}" ] && sysctl -qw net.core.rmem_max="$old_rmem" net.core.wmem_max="$old_wmem"
  [ -n "${old_shares:-}" ] && echo "$old_shares" > /sys/fs/cgroup/cpu/docker/cpu.shares
  [ -d "$grp" ] && { rmdir "$grp"/* "$grp" 2>/dev/null || true; }
  for c in $cgs; do [ -d "/sys/fs/cgroup/$c/$tag" ] && { rmdir "/sys/fs/cgroup/$c/$tag"/* "/sys/fs/cgroup/$c/$tag" 2>/dev/null || true; }; done
  return "$rc"
}
trap cleanup EXIT
"$bin/certs" quickstart --out "$work/pki" --endpoint-name cloud-endpoint --endpoint-name 10.99.7.2 --endpoint-name ep-bridge --endpoint-name ep-nosec --endpoint-name ep-shares --endpoint-name ep-binmount --endpoint-name ep-statevol >/dev/null
mkdir -p "$work/onprem/web01"
if [ -n "${BENCH_SAMPLE:-}" ]; then cp --sparse=always "$BENCH_SAMPLE" "$work/onprem/web01/web01.img";
else say "making the sample VM ($disk, ext4 with real files)"; tests/sample-disk.sh "$work/onprem/web01/web01.img" "$disk" small; fi
write_vmx "$work/onprem/web01/web01.vmx" web01 web01.img
chown -R 10001:10001 "$work/pki" "$work/onprem"
freeport() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
has() { [[ " $modes " == *" $1 "* ]]; }
host_env() { # DIR LISTEN
  echo CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true CLOUD_ENDPOINT_LISTEN=$2 CLOUD_ENDPOINT_API_LISTEN=off CLOUD_ENDPOINT_CERT=$work/pki/endpoint.pem \
    CLOUD_ENDPOINT_KEY=$work/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$work/pki/ca.pem \
    CLOUD_ENDPOINT_DATASTORE_DIR=$work/$1/datastore CLOUD_ENDPOINT_DATABASE=$work/$1/inventory.sqlite3
}
ctr_endpoint() { # NAME LISTEN DOCKER-ARGS...
  local name=$1 listen=$2; shift 2
  mkdir -p "$work/$name/datastore" "$work/$name/inventory"; chown -R 10001:10001 "$work/$name"
  docker run -d --name "$tag-$name" --init -e CLOUD_ENDPOINT_ALLOW_DEFAULT_PASSWORDS=true \
    -e CLOUD_ENDPOINT_LISTEN=$listen -e CLOUD_ENDPOINT_API_LISTEN=127.0.0.1:$(freeport) \
    -v "$work/pki:/etc/gateway/pki:ro" -v "$work/$name/datastore:/var/lib/gateway/datastore" \
    -v "$work/$name/inventory:/var/lib/gateway/inventory" "$@" "$endpoint_image" >/dev/null
}
wait_log() { for _ in $(seq 100); do grep -q "cloud endpoint serving" "$1" && return; sleep 0.1; done; say "no start: $1"; cat "$1" >&2; exit 1; }

if has hostpoll; then
  porthp=$(freeport)
  env $(host_env hostpoll 127.0.0.1:$porthp) "$bin/cloud-endpoint" serve 2> "$work/hostpoll-endpoint.log" & pids+=($!)
  wait_log "$work/hostpoll-endpoint.log"; echo $! > "$work/hostpoll.eppid"
  docker run -d --name "$tag-idle" --no-healthcheck --entrypoint sleep "$endpoint_image" infinity >/dev/null
fi
if has host; then
  port=$(freeport)
  env $(host_env host 127.0.0.1:$port) "$bin/cloud-endpoint" serve 2> "$work/host-endpoint.log" & pids+=($!)
  wait_log "$work/host-endpoint.log"; echo $! > "$work/host.eppid"
fi
if has hostgrp; then
  mkdir -p "$grp/ep" "$grp/edge"
  portg=$(freeport)
  sh -c 'echo $$ > "$0/ep/cgroup.procs"; exec "$@"' "$grp" env $(host_env hostgrp 127.0.0.1:$portg) "$bin/cloud-endpoint" serve 2> "$work/hostgrp-endpoint.log" & pids+=($!)
  wait_log "$work/hostgrp-endpoint.log"; echo $! > "$work/hostgrp.eppid"
fi
# hostcg: sh -c "$incg_sh" TAG ROLE CONTROLLERS CMD... runs CMD in ROLE's cgroups (ep or
# edge) in every controller named; sh execs CMD, so $! is CMD.
incg_sh='for c in $2; do echo $$ > "/sys/fs/cgroup/$c/$0/$1/cgroup.procs"; done; shift 2; exec "$@"'
if has hostcg; then
  for c in $cgs; do
    for d in "$tag" "$tag/ep" "$tag/edge"; do
      mkdir -p "/sys/fs/cgroup/$c/$d"
      if [ "$c" = cpuset ]; then
        cat "/sys/fs/cgroup/cpuset/$(dirname "$d" | sed 's#^\.$##')/cpuset.cpus" > "/sys/fs/cgroup/cpuset/$d/cpuset.cpus"
        cat "/sys/fs/cgroup/cpuset/$(dirname "$d" | sed 's#^\.$##')/cpuset.mems" > "/sys/fs/cgroup/cpuset/$d/cpuset.mems"
      fi
    done
  done
  portc=$(freeport)
  sh -c "$incg_sh" "$tag" ep "$cgs" env $(host_env hostcg 127.0.0.1:$portc) "$bin/cloud-endpoint" serve 2> "$work/hostcg-endpoint.log" & pids+=($!)
  wait_log "$work/hostcg-endpoint.log"; echo $! > "$work/hostcg.eppid"
fi
if [ -n "${BENCH_UDP_MEM_MAX:-}" ]; then
  old_rmem=$(sysctl -n net.core.rmem_max) old_wmem=$(sysctl -n net.core.wmem_max)
  sysctl -qw net.core.rmem_max="$BENCH_UDP_MEM_MAX" net.core.wmem_max="$BENCH_UDP_MEM_MAX"
fi
if [ -n "${BENCH_DOCKER_SHARES:-}" ]; then
  old_shares=$(cat /sys/fs/cgroup/cpu/docker/cpu.shares); echo "$BENCH_DOCKER_SHARES" > /sys/fs/cgroup/cpu/docker/cpu.shares
fi
if [ -n "${BENCH_HOG:-}" ]; then for _ in $(seq "$BENCH_HOG"); do sh -c 'while :; do :; done' & pids+=($!); done; fi
if has bridge || has nosec || has shares || has binmount || has statevol; then
  docker network create "$net" >/dev/null
fi
has bridge && ctr_endpoint bridge 0.0.0.0:4433 --network "$net" --network-alias ep-bridge
has shares && ctr_endpoint shares 0.0.0.0:4433 --network "$net" --network-alias ep-shares --cpu-shares 8192
has binmount && ctr_endpoint binmount 0.0.0.0:4433 --network "$net" --network-alias ep-binmount -v "$bin/cloud-endpoint:/usr/local/bin/cloud-endpoint:ro"
has statevol && ctr_endpoint statevol 0.0.0.0:4433 --network "$net" --network-alias ep-statevol
has nosec && ctr_endpoint nosec 0.0.0.0:4433 --network "$net" --network-alias ep-nosec --security-opt seccomp=unconfined
if has hostnet2; then port2=$(freeport); ctr_endpoint hostnet2 127.0.0.1:$port2 --network host; fi
if has netns; then
  ip netns add "$ns_a"; ip netns add "$ns_b"
  ip link add "$br" type bridge; ip link set "$br" up
  # Docker sets FORWARD's policy to DROP, and br_netfilter sends bridged packets through it.
  iptables -I FORWARD -i "$br" -o "$br" -j ACCEPT; fwd=1
  for s in a b; do
    n=$tag-$s; ip link add "${tag:0:9}h$s" type veth peer name eth0 netns "$n"
    ip link set "${tag:0:9}h$s" master "$br" up
    ip -n "$n" link set lo up; ip -n "$n" link set eth0 up
  done
  ip -n "$ns_a" addr add 10.99.7.1/24 dev eth0; ip -n "$ns_b" addr add 10.99.7.2/24 dev eth0
  ip netns exec "$ns_b" env $(host_env netns 10.99.7.2:4433) "$bin/cloud-endpoint" serve 2> "$work/netns-endpoint.log" & pids+=($!)
  wait_log "$work/netns-endpoint.log"; echo $! > "$work/netns.eppid"
fi
for _ in $(seq 60); do
  ok=1
  for c in $(docker ps -q --filter "name=^$tag-"); do
    [ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}healthy{{end}}' "$c")" = healthy ] || ok=0
  done
  [ $ok = 1 ] && break; sleep 0.5
done
sleep 1
if [ -n "${BENCH_WAN:-}" ]; then
  # The emulated WAN (tests/wan's relay and tbf, as wan.sh sizes them) on the path of
  # each setup that crosses a bridge: the relay holds every packet to or from the
  # endpoint's QUIC port for DELAY_MS (br_netfilter hands bridged packets to iptables),
  # tbf limits the rate both ways on the endpoint's veth pair.
  rate=${BENCH_WAN_RATE:-100mbit} delay=${BENCH_WAN_DELAY_MS:-75}
  bps=$(awk -v r="${rate%mbit}" 'BEGIN { printf "%d", r * 1e6 / 8 }')
  qb=$(awk -v b="$bps" -v d="$delay" 'BEGIN { q = b * 2 * d / 1000; if (q < 65536) q = 65536; printf "%d", q }')
  for q in 1717 1718; do
    chrt -f 10 "$bin/wan-relay" --queue "$q" --delay-ms "$delay" --stats-secs 1000 2> "$work/relay-$q.log" & pids+=($!)
  done
  sleep 0.5
  ep_ips=()
  if has netns; then
    ep_ips+=(10.99.7.2)
    tc qdisc replace dev "${tag:0:9}hb" root tbf rate "$rate" burst 65536 limit "$qb"
    ip netns exec "$ns_b" tc qdisc replace dev eth0 root tbf rate "$rate" burst 65536 limit "$qb"
  fi
  if has bridge; then
    c=$tag-bridge; ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$c"); ep_ips+=("$ip")
    cpid=$(docker inspect -f '{{.State.Pid}}' "$c")
    idx=$(nsenter -t "$cpid" -n ip -o link show eth0 | sed -E "s/.*@if([0-9]+).*/\\1/")
    hv=$(ip -o link | awk -F': ' -v i="$idx" '$1 == i { sub(/@.*/, "", $2); print $2 }')
    tc qdisc replace dev "$hv" root tbf rate "$rate" burst 65536 limit "$qb"
    nsenter -t "$cpid" -n tc qdisc replace dev eth0 root tbf rate "$rate" burst 65536 limit "$qb"
  fi
  for ip in "${ep_ips[@]}"; do
    iptables -w -t mangle -I FORWARD -d "$ip" -p udp --dport 4433 -j NFQUEUE --queue-num 1717
    iptables -w -t mangle -I FORWARD -s "$ip" -p udp --sport 4433 -j NFQUEUE --queue-num 1718
  done
  wan_rules=1
fi
ep_drops() { # MODE -> UDP datagrams dropped so far for a full receive buffer in the endpoint's network namespace
  local pid
  case $1 in
    host|hostgrp|hostcg|netns|hostpoll) pid=$(cat "$work/$1.eppid") ;;
    *) pid=$(docker inspect -f '{{.State.Pid}}' "$tag-$1") ;;
  esac
  awk '$1 == "Udp:" { if (!h) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") f = i; h = 1 } else print $f }' "/proc/$pid/net/snmp"
}
ep_cpu() { # MODE -> CPU seconds the endpoint of MODE used so far
  local pid c
  case $1 in
    host|hostgrp|hostcg|netns|hostpoll) pid=$(cat "$work/$1.eppid"); awk '{ print ($14 + $15) / 100 }' "/proc/$pid/stat" ;;
    *) c=$(docker inspect -f '{{.Id}}' "$tag-$1"); awk '{ print $1 / 1e9 }' "/sys/fs/cgroup/cpuacct/docker/$c/cpuacct.usage" ;;
  esac
}
now() { date +%s.%N; }
# 50 ms without starting a process: a read that times out on a pipe no one writes to.
exec {nap_fd}<> <(:)
nap() { read -t 0.05 -u "$nap_fd" _ || true; }
edge_args() { echo migrate --no-dedup --user migrator@cloud.local --name "$1"; }
cpuwrap() { python3 -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%.3f\n" % (u.ru_utime + u.ru_stime))
sys.exit(rc)' "$work/edgecpu" "$@"; }
lift() { # MODE NAME
  local m=$1 n=$2 c=$tag-e-$2
  local hostargs=(--vmx "$work/onprem/web01/web01.vmx" --ca-bundle "$work/pki/ca.pem" --cert "$work/pki/edge.pem" --key "$work/pki/edge.key" --state-dir "$work/state-$m" --receipt "$work/$n.receipt")
  local dargs=(-e 'EDGE_AGENT_PASSWORD=VMware1!Cloud' -v "$work/pki:/etc/gateway/pki:ro" -v "$work/onprem:/onprem")
  local cargs=(--vmx=/onprem/web01/web01.vmx --ca-bundle /etc/gateway/pki/ca.pem --cert /etc/gateway/pki/edge.pem --key /etc/gateway/pki/edge.key --receipt "/tmp/$n.receipt")
  case $m in
    host) cpuwrap env 'EDGE_AGENT_PASSWORD=VMware1!Cloud' "$bin/edge-agent" $(edge_args "$n") "${hostargs[@]}" --url "quic://localhost:$port" > "$work/$n.out" 2>&1 ;;
    hostgrp) cpuwrap sh -c 'echo $$ > "$0/edge/cgroup.procs"; exec "$@"' "$grp" env 'EDGE_AGENT_PASSWORD=VMware1!Cloud' "$bin/edge-agent" $(edge_args "$n") "${hostargs[@]}" --url "quic://localhost:$portg" > "$work/$n.out" 2>&1 ;;
    hostcg) cpuwrap sh -c "$incg_sh" "$tag" edge "$cgs" env 'EDGE_AGENT_PASSWORD=VMware1!Cloud' "$bin/edge-agent" $(edge_args "$n") "${hostargs[@]}" --url "quic://localhost:$portc" > "$work/$n.out" 2>&1 ;;
    hostpoll)
      local idle; idle=$(docker inspect -f '{{.Id}}' "$tag-idle")
      ( while [ "$(docker inspect -f '{{.State.Running}}' "$tag-idle")" = true ]; do
          cat "/sys/fs/cgroup/cpuacct/docker/$idle/cpuacct.usage" > /dev/null; sleep 0.05
        done ) & local poller=$!
      cpuwrap env 'EDGE_AGENT_PASSWORD=VMware1!Cloud' "$bin/edge-agent" $(edge_args "$n") "${hostargs[@]}" --url "quic://localhost:$porthp" > "$work/$n.out" 2>&1
      kill "$poller"; wait "$poller" 2>/dev/null || true ;;
    netns) cpuwrap ip netns exec "$ns_a" env 'EDGE_AGENT_PASSWORD=VMware1!Cloud' "$bin/edge-agent" $(edge_args "$n") "${hostargs[@]}" --url "quic://10.99.7.2:4433" > "$work/$n.out" 2>&1 ;;
    bridge|nosec|hostnet2|shares|binmount|statevol)
      local extra=() url
      # The state folder beside the host processes' (the image's VOLUME would otherwise
      # put it on the disk under /var/lib/docker): statevol keeps the volume.
      if [ "$m" != statevol ]; then
        mkdir -p "$work/state-$m"; chown 10001:10001 "$work/state-$m"
        dargs+=(-v "$work/state-$m:/var/lib/edge-agent")
      fi
      case $m in
        bridge) extra=(--network "$net"); url=quic://ep-bridge:4433 ;;
        nosec) extra=(--network "$net" --security-opt seccomp=unconfined); url=quic://ep-nosec:4433 ;;
        binmount) extra=(--network "$net" -v "$bin/edge-agent:/usr/local/bin/edge-agent:ro"); url=quic://ep-binmount:4433 ;;
        shares) extra=(--network "$net" --cpu-shares 8192); url=quic://ep-shares:4433 ;;
        statevol) extra=(--network "$net"); url=quic://ep-statevol:4433 ;;
        hostnet2) extra=(--network host); url=quic://localhost:$port2 ;;
      esac
      docker create --name "$c" "${dargs[@]}" "${extra[@]}" "$edge_image" $(edge_args "$n") "${cargs[@]}" --url "$url" >/dev/null
      local id; id=$(docker inspect -f '{{.Id}}' "$c")
      docker start "$c" >/dev/null
      local g=/sys/fs/cgroup/cpuacct/docker/$id u=0 v
      # The edge's CPU read from its cgroup by the shell itself, no process started per
      # poll, until the cgroup has no process left: the script's first version asked
      # `docker inspect` every 50 ms, and that client and the daemon's answers took CPU
      # from the lift being measured, in the container modes only (see hostpoll).
      while read -r _ 2>/dev/null < "$g/cgroup.procs"; do
        read -r v 2>/dev/null < "$g/cpuacct.usage" && u=$v; nap
      done
      docker wait "$c" >/dev/null
      echo "$u" | awk '{ printf "%.3f\n", $1 / 1e9 }' > "$work/edgecpu"
      docker logs "$c" > "$work/$n.out" 2>&1
      docker rm -v "$c" >/dev/null ;;
  esac
  awk '/^duration:/ { print $2 }' "$work/$n.out"
}
for r in $(seq "$rounds"); do
  line="round $r:"
  for m in $modes; do
    e0=$(ep_cpu "$m"); q0=$(ep_drops "$m")
    if [ -n "${BENCH_PERF:-}" ]; then
      perf record -q -a -F 497 -o "$BENCH_PERF/$m$r.data" 2>/dev/null & perf_pid=$!; sleep 0.5
    fi
    d=$(lift "$m" "$m$r") || { cat "$work/$m$r.out" >&2; exit 1; }
    if [ -n "${BENCH_PERF:-}" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    sleep 0.3; e1=$(ep_cpu "$m"); ec=$(cat "$work/edgecpu"); q1=$(ep_drops "$m")
    epc=$(awk -v a="$e0" -v b="$e1" 'BEGIN { printf "%.2f", b - a }')
    line+=" $m $d (CPU edge $ec endpoint $epc, rcvbuf drops $((q1 - q0)))"
    echo "$m $d $ec $epc" >> "$work/times"
  done
  say "$line"
done
[ -n "${BENCH_KEEP_OUT:-}" ] && cp "$work"/*.out "$BENCH_KEEP_OUT"/ 2>/dev/null
echo "medians: lift as the edge times it (s), CPU of edge + endpoint (s); each against the first mode"
for m in $modes; do
  med=$(awk -v m="$m" '$1 == m { print $2 }' "$work/times" | sed 's/s$//' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  cpu=$(awk -v m="$m" '$1 == m { print $3 + $4 }' "$work/times" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  echo "$m $med $cpu"
done | awk 'NR == 1 { b = $2; c = $3 } { printf "  %-9s %.2f s %+.1f %%   CPU %.2f s %+.1f %%\n", $1, $2, ($2 - b) * 100 / b, $3, ($3 - c) * 100 / c }'
# Each round's lift against the same round's first mode: the machine's other load drifts
# over a run and moves both sides of one round's ratio alike.
first=${modes%% *}
echo "median of the rounds' own ratios against $first (lift; CPU)"
for m in $modes; do
  [ "$m" = "$first" ] && continue
  paste <(awk -v m="$first" '$1 == m' "$work/times") <(awk -v m="$m" '$1 == m' "$work/times") | awk '{
    sub(/s$/, "", $2); sub(/s$/, "", $6); print ($6 - $2) * 100 / $2, ($7 + $8 - $3 - $4) * 100 / ($3 + $4) }' > "$work/ratios"
  printf '  %-9s %+.1f %%   CPU %+.1f %%\n' "$m" "$(cut -d' ' -f1 "$work/ratios" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')" \
    "$(cut -d' ' -f2 "$work/ratios" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')"
done
true
