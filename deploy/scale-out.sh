#!/usr/bin/env bash
# The scale-out deployment (deploy/compose.scale-out.yaml, docs/scale-out.md): PostgreSQL
# and three cloud endpoints, the hosts esx-a, esx-b and esx-c of one domain, on one
# shared inventory and one shared datastore volume.
#
# Usage: deploy/scale-out.sh up       certificates and a database password (made once
#                                     into the work folder), docker-compose up, waits
#                                     until the database and the three endpoints are
#                                     healthy, prints where their ports are
#        deploy/scale-out.sh lift     a small sample VM (once), lifted through esx-a by
#                                     the edge agent's container, then each endpoint's
#                                     inventory
#        deploy/scale-out.sh down     removes the containers, networks and volumes (the
#                                     work folder stays; delete it by hand)
#        deploy/scale-out.sh compose ARGS...   docker-compose with the deployment's
#                                     project, file and environment (ps, logs, ...)
#
# SCALE_OUT_DIR (default /var/tmp/gateway-scale-out) is the work folder: pki/,
# db-password, onprem/. SCALE_OUT_PROJECT (default gateway-scale-out) is the compose
# project. The images come from deploy/build-images.sh. Needs root (the files are handed
# to the containers' uid 10001) and docker-compose.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bin=${GATEWAY_BIN:-$root/target/release}
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }
die() { echo "deploy/scale-out.sh: $*" >&2; exit 1; }

work=${SCALE_OUT_DIR:-/var/tmp/gateway-scale-out}
project=${SCALE_OUT_PROJECT:-gateway-scale-out}
endpoints=(esx-a esx-b esx-c)
command -v docker-compose >/dev/null || die "no docker-compose (Debian: apt-get install docker-compose)"

# The database password: made once, kept in the work folder (0600), handed to compose.
password_file=$work/db-password
db_password() {
  if [ ! -s "$password_file" ]; then
    mkdir -p "$work"
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$password_file")
  fi
  cat "$password_file"
}

compose() {
  GATEWAY_DEPLOY_DIR=$work GATEWAY_DB_PASSWORD=$(db_password) \
    docker-compose -p "$project" -f "$root/deploy/compose.scale-out.yaml" "$@"
}

# Waits until `docker inspect` calls the service's container healthy (60 s at most).
wait_healthy() {
  local service=$1 id health state t0=$SECONDS
  id=$(compose ps -q "$service")
  [ -n "$id" ] || die "no container for $service"
  while :; do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$id")
    [ "$health" = healthy ] && return 0
    state=$(docker inspect -f '{{.State.Status}}' "$id")
    if [ "$state" = exited ] || [ $((SECONDS - t0)) -ge 60 ]; then
      compose logs --no-color --tail=30 "$service" >&2
      die "$service is not healthy ($state, $health after $((SECONDS - t0)) s)"
    fi
    sleep 0.5
  done
}

up() {
  docker image inspect gateway/cloud-endpoint:latest gateway/postgres:latest >/dev/null 2>&1 \
    || die "no images: run deploy/build-images.sh first"
  [ -x "$bin/certs" ] || die "no $bin/certs: cargo build --release --workspace"
  echo "work folder: $work (compose project $project)" >&2
  if [ ! -f "$work/pki/ca.pem" ]; then
    say "PKI: a CA, one certificate for the three endpoints (esx-a, esx-b, esx-c, localhost, 127.0.0.1), an edge certificate"
    "$bin/certs" quickstart --out "$work/pki" --endpoint-name esx-a --endpoint-name esx-b \
      --endpoint-name esx-c >/dev/null
    chown -R 10001:10001 "$work/pki"
  fi
  db_password >/dev/null
  say "docker-compose up: PostgreSQL, then the three endpoints once it is healthy"
  compose up -d
  for service in postgres "${endpoints[@]}"; do
    wait_healthy "$service"
    echo "$service healthy" >&2
  done
  say "the endpoints, on the host's loopback"
  for service in "${endpoints[@]}"; do
    printf '%s  QUIC %s  API https://%s/\n' "$service" \
      "$(compose port --protocol=udp "$service" 4433)" "$(compose port "$service" 8443)"
  done
}

lift() {
  say "on-prem: a sample VM web01 (${SCALE_OUT_DISK:-64M} ext4 disk with real files)"
  mkdir -p "$work/onprem/web01"
  if [ ! -f "$work/onprem/web01/web01.img" ]; then
    tests/sample-disk.sh "$work/onprem/web01/web01.img" "${SCALE_OUT_DISK:-64M}" small
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
ethernet0.networkName = "Prod-DMZ"
VMX
  chown -R 10001:10001 "$work/onprem"
  say "the lift, through esx-a"
  compose run --rm edge-agent
  for service in "${endpoints[@]}"; do
    say "the inventory as $service reads it (cloud-endpoint inventory)"
    compose exec -T "$service" cloud-endpoint inventory
  done
}

case ${1:-} in
  up) up ;;
  lift) lift ;;
  down) compose --profile edge down -v --remove-orphans -t 5 ;;
  compose) shift; compose "$@" ;;
  *) die "usage: deploy/scale-out.sh up|lift|down|compose ARGS..." ;;
esac
