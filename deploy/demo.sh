#!/usr/bin/env bash
# The compose deployment end to end: certificates (the workspace's `certs`), a small
# sample VM, `docker-compose up` (an endpoint on the cloud network, an edge on the
# on-prem and cloud networks), the lift, the copy compared with qemu-img inside the
# endpoint's image, the receipt verified, the inventory listed. Leaves the deployment up
# unless DEMO_DOWN=1 (then `docker-compose down -v` removes containers, networks and
# volumes).
#
# Usage: deploy/build-images.sh && deploy/demo.sh
#        DEMO_DIR=/some/dir DEMO_DISK=64M deploy/demo.sh
# Needs root (the files are handed to the containers' uid 10001) and docker-compose.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${GATEWAY_BIN:-$root/target/release}
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "deploy/demo.sh: $*" >&2; exit 1; }

command -v docker-compose >/dev/null || die "no docker-compose (Debian: apt-get install docker-compose)"
docker image inspect gateway/cloud-endpoint:latest gateway/edge-agent:latest >/dev/null 2>&1 \
  || die "no images: run deploy/build-images.sh first"
[ -x "$bin/certs" ] || die "no $bin/certs: cargo build --release --workspace"

work=${DEMO_DIR:-$(mktemp -d /tmp/gateway-compose.XXXXXX)}
mkdir -p "$work"
export GATEWAY_DEPLOY_DIR=$work
project=${DEMO_PROJECT:-gateway-demo}
compose() { docker-compose -p "$project" -f "$root/deploy/compose.yaml" "$@"; }
echo "work dir: $work (compose project $project)"

say "PKI: a CA, the endpoint's certificate (named cloud-endpoint), an edge certificate"
if [ ! -f "$work/pki/ca.pem" ]; then
  "$bin/certs" quickstart --out "$work/pki" --endpoint-name cloud-endpoint >/dev/null
fi
"$bin/certs" thumbprint "$work/pki/endpoint.pem"

say "on-prem: a sample VM (${DEMO_DISK:-64M} ext4 disk with real files)"
mkdir -p "$work/onprem/web01"
if [ ! -f "$work/onprem/web01/web01.img" ]; then
  tests/sample-disk.sh "$work/onprem/web01/web01.img" "${DEMO_DISK:-64M}" small
fi
cat > "$work/onprem/web01/web01.vmx" <<VMX
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "web01"
guestOS = "debian12-64"
numvcpus = "1"
memsize = "512"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.img"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "vmxnet3"
ethernet1.networkName = "Prod-DMZ"
VMX
# The containers run as uid 10001: the keys are theirs, the source VM readable.
chown -R 10001:10001 "$work/pki" "$work/onprem"

say "docker-compose up: the endpoint (healthy once /readyz answers), then the edge's lift"
compose up -d
edge=$(compose ps -q edge-agent)
status=$(docker wait "$edge")
compose logs --no-color edge-agent | tail -n 15
[ "$status" = 0 ] || { compose logs --no-color cloud-endpoint | tail -n 30; die "the edge exited with $status"; }

say "verify: qemu-img compare, source against the copy in the endpoint's datastore volume"
datastore=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/var/lib/gateway/datastore"}}{{.Name}}{{end}}{{end}}' "$(compose ps -q cloud-endpoint)")
docker run --rm --entrypoint qemu-img -v "$datastore:/ds:ro" -v "$work/onprem:/onprem:ro" \
  gateway/cloud-endpoint:latest compare /onprem/web01/web01.img /ds/web01/web01.vmdk

say "verify the signed receipt"
"$bin/edge-agent" verify-receipt --receipt "$work/onprem/web01.receipt.json" --ca-bundle "$work/pki/ca.pem" \
  "$work/onprem/web01/web01.vmx"

say "the cloud inventory, and the endpoint's readiness"
compose exec -T cloud-endpoint cloud-endpoint inventory
compose exec -T cloud-endpoint curl -sS --insecure https://127.0.0.1:8443/readyz
echo

if [ -n "${DEMO_DOWN:-}" ]; then
  compose down -v --remove-orphans
else
  echo "still up: docker-compose -p $project -f deploy/compose.yaml ps   (DEMO_DOWN=1 removes it at the end)"
fi
