#!/usr/bin/env bash
# Builds the images from the workspace's release binaries, with no registry:
#   gateway/cloud-endpoint:latest   the Debian base made here (deploy/base.sh) + QEMU
#   gateway/edge-agent:latest       FROM scratch: the binary and the glibc it links
#   gateway/postgres:latest         the same base + Debian's postgresql, for the shared
#                                   inventory of a scale-out domain (docs/scale-out.md)
# The binaries are copied from target/release (`cargo build --release --workspace`
# makes them), never built again inside an image. The base is built once per machine
# (about a minute and a half) and reused while deploy/base.sh is unchanged.
#
# Usage: deploy/build-images.sh            (GATEWAY_BIN=DIR to take the binaries elsewhere)
# Prints the sizes at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "deploy/build-images.sh: $*" >&2; }
die() { say "$*"; exit 1; }

bin=${GATEWAY_BIN:-target/release}
for b in cloud-endpoint edge-agent certs; do
  [ -x "$bin/$b" ] || die "no $bin/$b: build the workspace first (cargo build --release --workspace)"
done
command -v docker >/dev/null || die "no docker client"
docker info >/dev/null 2>&1 || die "no Docker engine answers (is the daemon running?)"

# One build at a time on this machine (tests in parallel processes all ask for the images).
exec 9>/tmp/gateway-build-images.lock
flock 9
base=$(deploy/base.sh)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# The cloud endpoint.
mkdir -p "$ctx/endpoint"
cp "$bin/cloud-endpoint" "$bin/certs" "$ctx/endpoint/"
# The release profile keeps debug info for the benchmarks' profiles; an image has no use
# for it (it is most of each binary's size).
strip --strip-debug "$ctx/endpoint/cloud-endpoint" "$ctx/endpoint/certs"
docker build -q -f deploy/cloud-endpoint.Dockerfile --build-arg "BASE=$base" \
  --label "org.opencontainers.image.revision=$revision" \
  -t gateway/cloud-endpoint:latest "$ctx/endpoint" >/dev/null

# The edge agent: the binary and each shared library ldd names, at the same paths.
root=$ctx/edge/rootfs
mkdir -p "$root/usr/local/bin" "$root/tmp" "$ctx/edge/state"
chmod 1777 "$root/tmp"
cp "$bin/edge-agent" "$root/usr/local/bin/"
strip --strip-debug "$root/usr/local/bin/edge-agent"
ldd "$bin/edge-agent" | awk '/=>/ { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
  [ -f "$lib" ] || continue
  cp --parents -L "$lib" "$root/"
done
docker build -q -f deploy/edge-agent.Dockerfile \
  --label "org.opencontainers.image.revision=$revision" \
  -t gateway/edge-agent:latest "$ctx/edge" >/dev/null
# The agent must run in its image as it is (a missing library shows here, not later).
docker run --rm gateway/edge-agent:latest --version >/dev/null \
  || die "gateway/edge-agent:latest does not start"

# PostgreSQL: one layer on the base, apt-get from the machine's mirror during the build
# (the build shares the host's network and its name for the mirror, as the host's apt
# reaches it). Docker's cache keeps that layer while the base and the recipe are the
# same, so after the first build this costs a second.
read -r mirror suite < <(deploy/apt-mirror.sh)
mirror_host=$(echo "$mirror" | sed -E 's#^[a-z]+://([^/:@]*@)?([^/:]+).*#\2#')
add_host=()
if address=$(getent ahostsv4 "$mirror_host" | awk 'NR == 1 { print $1 }') && [ -n "$address" ]; then
  add_host=(--add-host "$mirror_host:$address")
fi
mkdir -p "$ctx/postgres"
cp deploy/gateway-postgres "$ctx/postgres/"
docker build -q -f deploy/postgres.Dockerfile --network host "${add_host[@]}" \
  --build-arg "BASE=$base" --build-arg "MIRROR=$mirror" --build-arg "SUITE=$suite" \
  --label "org.opencontainers.image.revision=$revision" \
  -t gateway/postgres:latest "$ctx/postgres" >/dev/null \
  || die "building gateway/postgres:latest failed (its apt-get reads $mirror)"

for image in "$base" gateway/cloud-endpoint:latest gateway/edge-agent:latest gateway/postgres:latest; do
  printf '%-32s %s\n' "$image" "$(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec --suffix=B)"
done
