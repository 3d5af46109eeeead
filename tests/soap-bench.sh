#!/usr/bin/env bash
# SOAP benchmark: pyvmomi retrieving the name, power state and devices of every VM of a
# generated inventory through one container view (RetrievePropertiesEx paged by
# maxObjects), against the same retrieval through REST (the VM list, then each VM's
# GET for its devices). Not a timed test: it reports, it does not judge.
#
# Usage (from anywhere; root not needed):   tests/soap-bench.sh
#   SOAP_BENCH_N=1000     VMs in the generated inventory (tests/src/bin/soap-bench-seed.rs)
#   SOAP_BENCH_PAGE=100   maxObjects of each RetrievePropertiesEx page
#   SOAP_BENCH_ROUNDS=5   retrievals per API; best and median are reported
#   SOAP_BENCH_DIR=/tmp/gateway-soap-bench
#
# Reported: seconds per retrieval of all VMs (best and median of the rounds) for SOAP and
# REST, their ratio, and the endpoint's peak RSS (VmHWM) in each phase (a fresh endpoint
# process per phase, so each peak is its own). Where the time goes: the endpoint's own
# time per retrieval (the access log's duration_ms of the retrieval's requests, summed,
# per round) and, for SOAP, pyvmomi's parsing of the responses into Python objects in the
# median round.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${SOAP_BENCH_N:-1000}
PAGE=${SOAP_BENCH_PAGE:-100}
ROUNDS=${SOAP_BENCH_ROUNDS:-5}
dir=${SOAP_BENCH_DIR:-/tmp/gateway-soap-bench}
log() { printf '[soap-bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
[[ $N =~ ^[1-9][0-9]*$ ]] || die "SOAP_BENCH_N=$N is not a positive number"

cd "$root"
cargo build --release --workspace -q
bin=$root/target/release
python=$(bash tests/vapi/venv.sh) || die "the virtualenv with pyvmomi could not be made (tests/vapi/venv.sh needs PyPI)"

rm -rf "$dir"
mkdir -p "$dir"
"$bin/certs" quickstart --out "$dir/pki" >/dev/null
log "registering $N VMs"
"$bin/soap-bench-seed" "$dir/inventory.db" "$N" >&2

api_port=8443
while [ -n "$(ss -Hltn "sport = :$api_port")" ]; do api_port=$((api_port + 1)); done
quic_port=4433
while [ -n "$(ss -Hlnu "sport = :$quic_port")" ]; do quic_port=$((quic_port + 1)); done
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$quic_port CLOUD_ENDPOINT_CERT=$dir/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$dir/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$dir/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$dir/datastore CLOUD_ENDPOINT_DATABASE=$dir/inventory.db \
  CLOUD_ENDPOINT_LOG=${CLOUD_ENDPOINT_LOG:-warn,access=info} CLOUD_ENDPOINT_API_LISTEN=127.0.0.1:$api_port
start_ce() {
  "$bin/cloud-endpoint" serve >>"$dir/cloud-endpoint.log" 2>&1 &
  ce_pid=$!
  for _ in $(seq 100); do [ -n "$(ss -Hltn "sport = :$api_port")" ] && break; sleep 0.1; done
  kill -0 "$ce_pid" 2>/dev/null || { cat "$dir/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
}
stop_ce() { kill -TERM "$ce_pid"; wait "$ce_pid" || true; }
ce_kib() { awk -v k="$1:" '$1 == k {print $2}' /proc/"$ce_pid"/status; }
trap '[ -n "${ce_pid:-}" ] && kill "$ce_pid" 2>/dev/null || true' EXIT

# The endpoint's milliseconds per retrieval: every request of the phase but the logins,
# logouts and service content, summed from the access log, over the rounds.
endpoint_ms() {
  grep 'API request' "$dir/cloud-endpoint.log" | grep -v -e 'call="Login"' -e 'call="Logout"' \
    -e 'call="RetrieveServiceContent"' -e 'route=/api/session' |
    grep -oE 'duration_ms=[0-9.]+' | awk -F= -v r="$ROUNDS" '{s += $2} END {printf "%.1f", s / r}'
}
run() {
  : >"$dir/cloud-endpoint.log"
  start_ce
  local out
  out=$("$python" tests/soap/bench.py "$1" "127.0.0.1:$api_port" "$dir/pki/ca.pem" \
    auditor@cloud.local 'VMware1!Cloud' "$PAGE" "$ROUNDS") || { stop_ce; die "$1 phase failed"; }
  local rss
  rss=$(ce_kib VmHWM)
  stop_ce
  echo "$out" | sed "s/}\$/, \"peak_rss_kib\": $rss, \"endpoint_ms\": $(endpoint_ms)}/"
}
log "SOAP: $ROUNDS retrievals of $N VMs, pages of $PAGE"
soap=$(run soap)
log "REST: $ROUNDS retrievals of $N VMs"
rest=$(run rest)
echo "$soap" >"$dir/soap.json"
echo "$rest" >"$dir/rest.json"
"$python" - "$soap" "$rest" <<'PY'
import json, sys
s, r = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert s["vms"] == r["vms"], f"SOAP saw {s['vms']} VMs, REST {r['vms']}"
print(f"VMs:             {s['vms']} (devices: SOAP {s['devices']}, REST {r['devices']})")
print(f"SOAP (pyvmomi):  best {s['best']:.3f} s, median {s['median']:.3f} s, endpoint peak RSS {s['peak_rss_kib'] / 1024:.1f} MiB")
print(f"REST (/api):     best {r['best']:.3f} s, median {r['median']:.3f} s, endpoint peak RSS {r['peak_rss_kib'] / 1024:.1f} MiB")
print(f"SOAP / REST:     {s['median'] / r['median']:.2f} (median), {s['best'] / r['best']:.2f} (best)")
print(f"endpoint time:   SOAP {s['endpoint_ms']:.0f} ms, REST {r['endpoint_ms']:.0f} ms per retrieval (access log)")
print(f"pyvmomi parsing: {s['median_parse']:.3f} s of SOAP's median {s['median']:.3f} s "
      f"({s['median_parse'] / s['median']:.0%}); the rest: the endpoint, TLS and pyvmomi's requests")
PY
