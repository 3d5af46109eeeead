#!/usr/bin/env bash
# The same lift twice over, in the same run: between host processes (endpoint and edge
# on loopback, as tests/demo.sh) and through the compose deployment (the edge container
# reaching the endpoint container over the cloud network). Alternating rounds, the
# median of each; plus the image sizes and the endpoint's idle RSS both ways, and the
# edge's peak RSS. Prints a Markdown table (docs/containers.md has the figures).
#
# Usage: deploy/build-images.sh && deploy/bench.sh      (BENCH_DISK=512M BENCH_ROUNDS=3)
#   BENCH_TMP=/tmp   where the sample VM, both datastores and the state go. /dev/shm keeps
#                    the disk out of the comparison (this machine's page cache is reclaimed
#                    within seconds, so each lift may read its source from the disk or not:
#                    the host processes' walls spread 0.9-2.3 s in one run); it holds every
#                    round's three lifted VMs, about half the sample's size each.
# Where the difference goes (host processes in cgroups or network namespaces, the images on
# the host's network, without seccomp, ...; and both behind an emulated WAN link):
# deploy/bench-paths.sh, documented in its header.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. "$root/tests/bench-lib.sh"
bin=${GATEWAY_BIN:-$root/target/release}
disk=${BENCH_DISK:-512M}
rounds=${BENCH_ROUNDS:-3}
say() { echo "deploy/bench.sh: $*" >&2; }

work=$(mktemp -d "${BENCH_TMP:-/tmp}/gateway-bench.XXXXXX")
export GATEWAY_DEPLOY_DIR=$work
project=gwbench-$$
# The endpoint container's datastore and inventory in $work too, not in Docker's named
# volumes (under /var/lib/docker): both endpoints then write to the same file system.
# So does the edge's state folder (its checkpoint, synced every second during a lift):
# on compose's edge-state volume it sat on the disk while the host edge's was in $work.
mkdir -p "$work/ctr/datastore" "$work/ctr/inventory" "$work/ctr/edge-state"
chown -R 10001:10001 "$work/ctr"
cat > "$work/bench-volumes.yaml" <<YAML
services:
  cloud-endpoint:
    volumes:
      - $work/ctr/datastore:/var/lib/gateway/datastore
      - $work/ctr/inventory:/var/lib/gateway/inventory
  edge-agent:
    volumes:
      - $work/ctr/edge-state:/var/lib/edge-agent
YAML
compose() { docker-compose -p "$project" -f "$root/deploy/compose.yaml" -f "$work/bench-volumes.yaml" "$@"; }
endpoint_pid=
cleanup() {
  [ -n "$endpoint_pid" ] && kill "$endpoint_pid" 2>/dev/null && wait "$endpoint_pid" 2>/dev/null
  compose down -v --remove-orphans -t 2 >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/certs" quickstart --out "$work/pki" --endpoint-name cloud-endpoint >/dev/null
mkdir -p "$work/onprem/web01"
say "making the sample VM ($disk, ext4 with real files)"
tests/sample-disk.sh "$work/onprem/web01/web01.img" "$disk" small
write_vmx "$work/onprem/web01/web01.vmx" web01 web01.img
chown -R 10001:10001 "$work/pki" "$work/onprem"

# Host processes: the endpoint on loopback.
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CLOUD_ENDPOINT_LISTEN=127.0.0.1:$port CLOUD_ENDPOINT_API_LISTEN=off \
CLOUD_ENDPOINT_CERT=$work/pki/endpoint.pem CLOUD_ENDPOINT_KEY=$work/pki/endpoint.key \
CLOUD_ENDPOINT_EDGE_CA=$work/pki/ca.pem CLOUD_ENDPOINT_DATASTORE_DIR=$work/host/datastore \
CLOUD_ENDPOINT_DATABASE=$work/host/inventory.sqlite3 \
  "$bin/cloud-endpoint" serve 2> "$work/host-endpoint.log" &
endpoint_pid=$!
for _ in $(seq 100); do grep -q "cloud endpoint serving" "$work/host-endpoint.log" && break; sleep 0.1; done
sleep 2
host_idle_rss=$(awk '/VmRSS/ { print $2 }' "/proc/$endpoint_pid/status")

# The compose deployment: the endpoint container, healthy.
GATEWAY_API_PUBLISH=127.0.0.1: compose up -d cloud-endpoint >/dev/null 2>&1
cid=$(compose ps -q cloud-endpoint)
for _ in $(seq 120); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ] && break
  sleep 0.5
done
sleep 2
# docker top: host PIDs with their RSS (KiB); the endpoint, not tini.
container_idle_rss=$(docker top "$cid" -o pid,rss,args | awk '/cloud-endpoint serve/ && !/init/ { print $2 }' | head -n1)

now() { date +%s.%N; }
# A pause without starting a process: a read that times out on a pipe no one writes to.
exec {nap_fd}<> <(:)
nap() { read -t "$1" -u "$nap_fd" _ || true; }
host_lift() { # host_lift NAME
  local t0; t0=$(now)
  # --no-dedup: the same disk is lifted again and again; each lift must cross the link.
  EDGE_AGENT_PASSWORD='VMware1!Cloud' "$bin/edge-agent" migrate --no-dedup --vmx "$work/onprem/web01/web01.vmx" \
    --url "quic://localhost:$port" --user migrator@cloud.local --ca-bundle "$work/pki/ca.pem" \
    --cert "$work/pki/edge.pem" --key "$work/pki/edge.key" --name "$1" \
    --receipt "$work/$1.receipt.json" --state-dir "$work/host-state" > "$work/$1.out" 2>&1
  awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }'
}
container_lift() { # container_lift NAME
  local t0 name=$project-$1 c peak=0 rss; t0=$(now)
  # --no-dedup as on the host: without it each round after the first would be copied
  # inside the cloud from the previous round's VM instead of crossing the network.
  GATEWAY_API_PUBLISH=127.0.0.1: compose run -d --no-deps --name "$name" edge-agent migrate --no-dedup \
    --vmx=/onprem/web01/web01.vmx --name "$1" --receipt "/tmp/$1.receipt.json" >/dev/null 2>&1
  # The peak RSS is the kernel's (VmHWM), read by the shell itself until the process is
  # gone: polling `docker inspect` and `docker top` every 0.2 s, as this script first did,
  # took CPU from the container lift it measured (docs/containers.md).
  local pid k; pid=$(docker inspect -f '{{.State.Pid}}' "$name")
  while [ "$pid" != 0 ] && [ -e "/proc/$pid" ]; do
    { while read -r k rss _; do
        [ "$k" = VmHWM: ] && [ "$rss" -gt "$peak" ] && peak=$rss
      done < "/proc/$pid/status"; } 2>/dev/null || true
    nap 0.2
  done
  docker wait "$name" >/dev/null
  [ "$(docker inspect -f '{{.State.ExitCode}}' "$name")" = 0 ] || { docker logs "$name" >&2; exit 1; }
  docker logs "$name" > "$work/$1.out" 2>&1
  awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }'
  docker rm "$name" >/dev/null
  if [ "$peak" -gt "$(cat "$work/edge-peak" 2>/dev/null || echo 0)" ]; then echo "$peak" > "$work/edge-peak"; fi
}
# The edge in its container on the host's network, to the endpoint process on loopback:
# the container's own cost (its start, cgroup, the image's file system, the volumes)
# without the Docker bridge between the two.
mkdir -p "$work/hostnet-state"; chown 10001:10001 "$work/hostnet-state"
hostnet_lift() { # hostnet_lift NAME
  local t0 name=$project-$1; t0=$(now)
  docker run -d --name "$name" --network host -e 'EDGE_AGENT_PASSWORD=VMware1!Cloud' \
    -v "$work/pki:/etc/gateway/pki:ro" -v "$work/onprem:/onprem" -v "$work/hostnet-state:/var/lib/edge-agent" \
    gateway/edge-agent:latest migrate --no-dedup --vmx=/onprem/web01/web01.vmx --url "quic://localhost:$port" \
    --user migrator@cloud.local --ca-bundle /etc/gateway/pki/ca.pem --cert /etc/gateway/pki/edge.pem \
    --key /etc/gateway/pki/edge.key --name "$1" --receipt "/var/lib/edge-agent/$1.receipt.json" >/dev/null
  [ "$(docker wait "$name")" = 0 ] || { docker logs "$name" >&2; exit 1; }
  docker logs "$name" > "$work/$1.out" 2>&1
  awk -v a="$(now)" -v b="$t0" 'BEGIN { print a - b }'
  docker rm "$name" >/dev/null
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

for r in $(seq "$rounds"); do
  h=$(host_lift "host$r"); c=$(container_lift "ctr$r"); n=$(hostnet_lift "net$r")
  say "round $r: host processes ${h} s, containers ${c} s, edge container on the host network ${n} s"
  echo "$h" >> "$work/host.times"; echo "$c" >> "$work/ctr.times"; echo "$n" >> "$work/net.times"
  awk '/^duration:/ { print $2 }' "$work/net$r.out" >> "$work/net.lift"
  # The edge's own figure: from its connection to the commit, without process or
  # container start.
  awk '/^duration:/ { print $2 }' "$work/host$r.out" >> "$work/host.lift"
  awk '/^duration:/ { print $2 }' "$work/ctr$r.out" >> "$work/ctr.lift"
done
host_lift_s=$(median < "$work/host.lift"); ctr_lift_s=$(median < "$work/ctr.lift")
# Each round's containers against the same round's host processes: a drift over the run
# (the machine's other load) moves both sides of a ratio alike.
pair_ratio=$(paste "$work/host.lift" "$work/ctr.lift" | awk '{ print ($2 - $1) * 100 / $1 }' | median)
host=$(median < "$work/host.times"); ctr=$(median < "$work/ctr.times")
net=$(median < "$work/net.times"); net_lift_s=$(median < "$work/net.lift")
size() { docker image inspect -f '{{.Size}}' "$1" | numfmt --to=iec --suffix=B; }
logical=$(stat -c %s "$work/onprem/web01/web01.img")

echo
echo "| | host processes | compose deployment |"
echo "|---|---|---|"
printf '| lift of a %s sample VM (median of %s, wall, edge start to exit) | %.2f s | %.2f s (%+.1f %%) |\n' \
  "$(numfmt --to=iec "$logical")" "$rounds" "$host" "$ctr" "$(awk -v c="$ctr" -v h="$host" 'BEGIN { print (c - h) * 100 / h }')"
printf '| the same, as the edge times it (connection to commit) | %.2f s | %.2f s (%+.1f %%) |\n' \
  "$host_lift_s" "$ctr_lift_s" "$(awk -v c="$ctr_lift_s" -v h="$host_lift_s" 'BEGIN { print (c - h) * 100 / h }')"
printf '| the same, median of the rounds'"'"' own ratios (containers / host processes of one round) | | %+.1f %% |\n' "$pair_ratio"
printf '| edge container on the host network, to the endpoint process (wall; as the edge times it) | %.2f s; %.2f s | %+.1f %%; %+.1f %% against host processes |\n' \
  "$net" "$net_lift_s" "$(awk -v c="$net" -v h="$host" 'BEGIN { print (c - h) * 100 / h }')" \
  "$(awk -v c="$net_lift_s" -v h="$host_lift_s" 'BEGIN { print (c - h) * 100 / h }')"
printf '| cloud endpoint idle RSS | %s MiB | %s MiB |\n' "$((host_idle_rss / 1024))" "$((container_idle_rss / 1024))"
printf '| edge agent peak RSS during the lift | | %s MiB |\n' "$(( $(cat "$work/edge-peak" 2>/dev/null || echo 0) / 1024 ))"
echo
echo "| image | size |"
echo "|---|---|"
for i in gateway/cloud-endpoint:latest gateway/edge-agent:latest; do echo "| $i | $(size "$i") |"; done
