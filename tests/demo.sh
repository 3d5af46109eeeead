#!/usr/bin/env bash
# A complete lift on one machine, no setup: certificates, a cloud endpoint on
# loopback with the built-in domain, a realistic sample VM (ext4 made with
# mkfs.ext4 -d from real files, plus zeros), the migration, its verification
# with qemu-img, and the cloud inventory.
#
# Usage: tests/demo.sh            (work dir in /tmp, kept for inspection)
#        DEMO_DIR=/some/dir tests/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building (release)"
if ! command -v qemu-img >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
  apt-get update -qq && apt-get install -y -qq qemu-utils e2fsprogs >/dev/null
fi
cargo build --release --workspace --quiet
bin=$root/target/release

work=${DEMO_DIR:-$(mktemp -d /tmp/gateway-demo.XXXXXX)}
mkdir -p "$work"
echo "work dir: $work"

say "PKI: a CA, the cloud endpoint's certificate, an edge certificate"
"$bin/certs" quickstart --out "$work/pki"
thumbprint=$("$bin/certs" thumbprint "$work/pki/endpoint.pem")

say "on-prem: a sample VM (1 GiB ext4 disk with real files, two NICs)"
mkdir -p "$work/onprem/web01"
tests/sample-disk.sh "$work/onprem/web01/web01.img" 1G small
cat > "$work/onprem/web01/web01.vmx" <<VMX
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "web01"
guestOS = "debian12-64"
numvcpus = "2"
memsize = "2048"
firmware = "efi"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "web01.img"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-image"
ide1:0.fileName = "debian-12.iso"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:3f:00:01"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "vmxnet3"
ethernet1.networkName = "Prod-DMZ"
ethernet1.addressType = "generated"
ethernet1.generatedAddress = "00:0c:29:aa:bb:cc"
VMX
"$bin/edge-agent" inspect "$work/onprem/web01/web01.vmx"

say "cloud: endpoint on loopback with the built-in domain"
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
api_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$port
export CLOUD_ENDPOINT_API_LISTEN=127.0.0.1:$api_port
export CLOUD_ENDPOINT_CERT=$work/pki/endpoint.pem
export CLOUD_ENDPOINT_KEY=$work/pki/endpoint.key
export CLOUD_ENDPOINT_EDGE_CA=$work/pki/ca.pem
export CLOUD_ENDPOINT_DATASTORE_DIR=$work/cloud/datastore
export CLOUD_ENDPOINT_DATABASE=$work/cloud/inventory.sqlite3
"$bin/cloud-endpoint" serve 2> "$work/cloud-endpoint.log" &
endpoint_pid=$!
trap 'kill $endpoint_pid 2>/dev/null || true; wait $endpoint_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q "cloud endpoint serving" "$work/cloud-endpoint.log" && break
  kill -0 $endpoint_pid 2>/dev/null || { cat "$work/cloud-endpoint.log"; exit 1; }
  sleep 0.1
done
echo "listening on UDP 127.0.0.1:$port, vSphere REST API on https://127.0.0.1:$api_port/api (log: $work/cloud-endpoint.log)"

say "migrate: edge-agent -> QUIC + TLS 1.3 (mutual) -> cloud-endpoint"
# The endpoint is trusted through the CA bundle AND its pinned thumbprint.
"$bin/edge-agent" migrate \
  --vmx "$work/onprem/web01/web01.vmx" \
  --url "quic://localhost:$port" \
  --user migrator@cloud.local --password 'VMware1!Cloud' \
  --ca-bundle "$work/pki/ca.pem" --thumbprint "$thumbprint" \
  --cert "$work/pki/edge.pem" --key "$work/pki/edge.key" \
  --map-network "Prod-DMZ=cloud-web" \
  --receipt "$work/web01.receipt.json"

say "verify the signed receipt: endpoint signature and identity, Merkle roots re-read from the source"
"$bin/edge-agent" verify-receipt --receipt "$work/web01.receipt.json" \
  --ca-bundle "$work/pki/ca.pem" --thumbprint "$thumbprint" "$work/onprem/web01/web01.vmx"

say "verify: qemu-img compare source and cloud copy"
dest=$CLOUD_ENDPOINT_DATASTORE_DIR/web01
qemu-img compare "$work/onprem/web01/web01.img" "$dest/web01.vmdk"
qemu-img check "$dest/web01.vmdk" >/dev/null && echo "qemu-img check: no errors"
echo "allocated in the cloud: $(du -h "$dest/web01-flat.vmdk" | cut -f1) of $(du -h --apparent-size "$dest/web01-flat.vmdk" | cut -f1) (zeros stay holes)"

say "cloud inventory"
"$bin/cloud-endpoint" inventory

if command -v curl >/dev/null; then
  say "the same VM through the vSphere REST API (curl, as a vSphere client would)"
  api=https://127.0.0.1:$api_port/api
  token=$(curl -sS --fail --cacert "$work/pki/ca.pem" -u 'auditor@cloud.local:VMware1!Cloud' -X POST "$api/session" | tr -d '"')
  curl -sS --fail --cacert "$work/pki/ca.pem" -H "vmware-api-session-id: $token" "$api/vcenter/vm?names=web01"
  echo
  curl -sS --fail --cacert "$work/pki/ca.pem" -X DELETE -H "vmware-api-session-id: $token" "$api/session"
fi
echo
echo "files: $dest"
ls -l "$dest"
