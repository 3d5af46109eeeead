#!/usr/bin/env bash
# Benchmark: a gateway lift (edge-agent -> cloud-endpoint, QUIC + mTLS + zstd) of a
# realistic VM disk against what a user would otherwise do (scp over a loopback sshd).
#
# Usage (as root, from anywhere):   tests/bench.sh
#   BENCH_DIR=/tmp/gateway-bench  cache of sample images + results.json (kept between runs)
#   BENCH_SIZE=1G                 sample disk size; e.g. 256M for a quick run (own image file)
#   BENCH_REPS=3                  repetitions of each tool; the table shows medians
#   BENCH_SSH_PORT=2222           first port tried for the private sshd (next free one used)
#   BENCH_QUIC_PORT=4433          first UDP port tried for cloud-endpoint
#   BENCH_CACHE=drop|warm         page cache before each timed run (default: drop if the
#                                 kernel lets us, else warm = read the image once first)
#   BENCH_KEEP=1                  keep the run's temp dir (logs, datastore) for inspection
#   BENCH_BUILD=1                 cargo build --release --workspace first (0: use BENCH_BIN)
#   BENCH_BIN=target/release      where the binaries are (a copy, to compare two builds)
#   BENCH_FORMATS="streamOptimized.vmdk compressed.qcow2"   other source formats timed ("" none)
#   BENCH_QUIET_WAIT=120          seconds to wait for a quiet machine before each run
#
# What is measured, per tool and rep: wall time (GNU time), CPU seconds (user+sys) and
# peak RSS of the client and of the server side, and the bytes on the wire.
#  - scp: client under GNU time. Server: a private `sshd -d` (serves exactly one
#    connection, then exits) wrapped in GNU time, so its CPU is the whole server tree
#    (listener/monitor, privsep children, sftp-server; OpenSSH 9 scp speaks SFTP) reaped
#    by wait4, and its RSS is the largest single process of that tree. Wire bytes are
#    the SSH stream bytes `scp -v` reports ("Transferred: sent N").
#  - lift: edge-agent under GNU time; cloud-endpoint runs once for all reps, so its CPU
#    is the delta of /proc/PID/stat utime+stime across each lift and its peak RSS is
#    VmHWM, reset before each rep via /proc/PID/clear_refs (5) when the kernel allows
#    (else the peak across all reps so far). Wire bytes: the summary's UDP payload bytes.
# Every lift runs with --no-dedup: the reps lift the same disk, and the cloud would
# otherwise copy it from the previous rep instead of receiving it (tests/dedup-bench.sh
# measures that). Both wire figures exclude IP/UDP/TCP headers. Note the lift fsyncs the disk before it
# registers the VM (inside its wall time); scp does not fsync.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/tests/bench-lib.sh"
BENCH_DIR=${BENCH_DIR:-/tmp/gateway-bench}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_REPS=${BENCH_REPS:-3}
log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (sshd, drop_caches, apt-get)"
[[ $BENCH_SIZE =~ ^[0-9]+[KMGT]?$ ]] || die "BENCH_SIZE=$BENCH_SIZE is not like 1G or 256M"
[[ $BENCH_REPS =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPS=$BENCH_REPS is not a positive number"

# --- tools (install only what is missing) ---------------------------------------------
need_pkgs=()
[ -x /usr/bin/time ] || need_pkgs+=(time)
[ -x /usr/sbin/sshd ] || need_pkgs+=(openssh-server)
command -v jq >/dev/null || need_pkgs+=(jq)
command -v ss >/dev/null || need_pkgs+=(iproute2)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
command -v qemu-img >/dev/null || die "qemu-img (qemu-utils) is needed for the correctness check"

# --- build, sample disk ---------------------------------------------------------------
if [ "${BENCH_BUILD:-1}" = 1 ]; then
  log "cargo build --release --workspace"
  (cd "$root" && cargo build --release --workspace --quiet)
fi
bin=$(realpath "${BENCH_BIN:-$root/target/release}")

img=$(sample_disk "$BENCH_SIZE")
size=$(stat -c %s "$img")

# --- temp dir, cleanup ----------------------------------------------------------------
# The temp dir lives in BENCH_DIR, so copy targets are on the same disk as the image.
tmp=$(mktemp -d "$BENCH_DIR/run.XXXXXX")
ce_pid='' sshd_pid=''
cleanup() {
  local rc=$? kids=''
  # sshd_pid is GNU time's; stop the sshd it runs (its child, by id) first.
  [ -n "$sshd_pid" ] && kids=$(cat /proc/"$sshd_pid"/task/*/children 2>/dev/null || true)
  for pid in $kids $sshd_pid $ce_pid; do
    kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# First port >= $2 with no listener of protocol $1 (t or u).
free_port() { local p=$2; while [ -n "$(ss -Hln"$1" "sport = :$p")" ]; do p=$((p + 1)); done; echo "$p"; }
# Waits until something listens on port $2 (protocol $1), or dies after 10 s.
wait_listen() {
  for _ in $(seq 100); do [ -n "$(ss -Hln"$1" "sport = :$2")" ] && return 0; sleep 0.1; done
  die "nothing listens on port $2 after 10 s"
}

# --- page cache policy ----------------------------------------------------------------
# Cold cache is the honest case (a VM disk is not in RAM); in a container drop_caches may
# be refused, then every tool gets the same warm cache instead.
cache=${BENCH_CACHE:-drop}
if [ "$cache" = drop ] && ! (sync && echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
  log "cannot drop the page cache here: warming it instead"; cache=warm
fi
prepare_cache() {
  sync # flush the previous run's writes so their writeback does not bill the next run
  if [ "$cache" = drop ]; then echo 3 >/proc/sys/vm/drop_caches; else cat "$img" >/dev/null; fi
}
# GNU time output: last line (sshd -d exits 255, which time reports on a line before).
read_time() { tail -n1 "$1"; } # "wall user sys maxrss_kib"
TIMEFMT='%e %U %S %M'
clk_tck=$(getconf CLK_TCK)
# Busy CPU ticks of the whole machine (user nice system irq softirq steal): the part not
# used by the measured processes is "other" load, e.g. another job compiling.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# Both ends share 2 cores, so a concurrent job skews a run: before each one, wait (up to
# BENCH_QUIET_WAIT s) for a second in which the machine is below 15 % of one core busy.
wait_quiet() {
  local t0 end=$((SECONDS + ${BENCH_QUIET_WAIT:-120}))
  while [ $SECONDS -lt $end ]; do
    t0=$(busy_ticks); sleep 1
    [ $(($(busy_ticks) - t0)) -lt $((clk_tck * 15 / 100)) ] && return 0
  done
  log "warning: the machine stayed busy; measuring anyway (see other_cpu in results)"
}

# --- scp baseline: private sshd on loopback -------------------------------------------
ssh_port=$(free_port t "${BENCH_SSH_PORT:-2222}")
mkdir -p "$tmp/ssh" "$tmp/scp-dst" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$tmp/ssh/client_key"
cp "$tmp/ssh/client_key.pub" "$tmp/ssh/authorized_keys"
cat >"$tmp/ssh/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $tmp/ssh/host_key
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $tmp/ssh/authorized_keys
StrictModes no
UsePAM no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
/usr/sbin/sshd -t -f "$tmp/ssh/sshd_config" || die "sshd rejects its config"
ssh_opts=(-i "$tmp/ssh/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
          -o BatchMode=yes -o LogLevel=ERROR -P "$ssh_port")
[ "$(stat -c %d "$img")" = "$(stat -c %d "$tmp")" ] || log "note: copy targets are on another file system than the image"

log "scp: $BENCH_REPS reps of $size bytes to 127.0.0.1:$ssh_port (cache: $cache)"
for i in $(seq "$BENCH_REPS"); do
  rm -f "$tmp/scp-dst/disk.img"
  wait_quiet; prepare_cache; b0=$(busy_ticks)
  # sshd -d: no daemonising, one connection, then exit; GNU time sees the whole tree.
  /usr/bin/time -f "$TIMEFMT" -o "$tmp/sshd.$i.time" \
    /usr/sbin/sshd -d -f "$tmp/ssh/sshd_config" 2>"$tmp/sshd.$i.log" &
  sshd_pid=$!
  wait_listen t "$ssh_port"
  # -v only for the "Transferred:" byte count at the end (a few dozen debug lines).
  /usr/bin/time -f "$TIMEFMT" -o "$tmp/scp.$i.time" \
    scp -v "${ssh_opts[@]}" "$img" "root@127.0.0.1:$tmp/scp-dst/disk.img" 2>"$tmp/scp.$i.log" \
    || { tail -5 "$tmp/scp.$i.log" "$tmp/sshd.$i.log" >&2; die "scp rep $i"; }
  wait "$sshd_pid" || true; sshd_pid=''; b1=$(busy_ticks)
  [ "$(stat -c %s "$tmp/scp-dst/disk.img")" = "$size" ] || die "scp copied a short file"
  read -r wall cu cs crss <<<"$(read_time "$tmp/scp.$i.time")"
  read -r _ su sy srss <<<"$(read_time "$tmp/sshd.$i.time")"
  wire=$(sed -n 's/^Transferred: sent \([0-9]*\),.*/\1/p' "$tmp/scp.$i.log")
  cipher=$(sed -n 's/.*kex: client->server cipher: \([^ ]*\) .*/\1/p' "$tmp/sshd.$i.log" | tail -n1)
  jq -nc --arg w "$wall" --arg cc "$cu $cs" --arg sc "$su $sy" --arg cr "$crss" --arg sr "$srss" \
    --arg wire "${wire:-}" --arg cipher "$cipher" --arg busy "$(((b1 - b0) * 100 / clk_tck))" \
    '{wall:($w|tonumber), cpu_client:($cc|split(" ")|map(tonumber)|add),
      cpu_server:($sc|split(" ")|map(tonumber)|add), rss_client_kib:($cr|tonumber),
      rss_server_kib:($sr|tonumber), wire_bytes:(if $wire=="" then null else ($wire|tonumber) end),
      cipher:$cipher} | .other_cpu = ((($busy|tonumber)/100 - .cpu_client - .cpu_server)*100|round/100)' >>"$tmp/scp.jsonl"
  log "scp rep $i: $(tail -n1 "$tmp/scp.jsonl")"
done
rm -f "$tmp/scp-dst/disk.img"

# --- gateway lift ---------------------------------------------------------------------
quic_port=$(free_port u "${BENCH_QUIC_PORT:-4433}")
"$bin/certs" quickstart --out "$tmp/pki" >/dev/null
mkdir -p "$tmp/vm"
ln -s "$img" "$tmp/vm/sample-disk.img" # the .vmx names its disk relative to its folder
write_vmx "$tmp/vm/bench.vmx" bench01 sample-disk.img 00:50:56:aa:bb:cc
export CLOUD_ENDPOINT_LISTEN=127.0.0.1:$quic_port CLOUD_ENDPOINT_CERT=$tmp/pki/endpoint.pem \
  CLOUD_ENDPOINT_KEY=$tmp/pki/endpoint.key CLOUD_ENDPOINT_EDGE_CA=$tmp/pki/ca.pem \
  CLOUD_ENDPOINT_DATASTORE_DIR=$tmp/datastore CLOUD_ENDPOINT_DATABASE=$tmp/inventory.db \
  CLOUD_ENDPOINT_LOG=${CLOUD_ENDPOINT_LOG:-warn} CLOUD_ENDPOINT_API_LISTEN=off
"$bin/cloud-endpoint" serve >"$tmp/cloud-endpoint.log" 2>&1 &
ce_pid=$! hwm_reset=yes
wait_listen u "$quic_port"
kill -0 "$ce_pid" 2>/dev/null || { cat "$tmp/cloud-endpoint.log" >&2; die "cloud-endpoint did not start"; }
# utime+stime of the whole process (all threads), in clock ticks; fields 14 and 15 of
# stat, counted after the ")" that ends the command name (which may contain spaces).
ce_ticks() { local s; s=$(</proc/"$ce_pid"/stat); s=${s##*) }; awk '{print $12 + $13}' <<<"$s"; }
ce_kib() { awk -v k="$1:" '$1 == k {print $2}' /proc/"$ce_pid"/status; } # VmHWM, VmRSS

log "lift: $BENCH_REPS reps to quic://127.0.0.1:$quic_port (cache: $cache)"
for i in $(seq "$BENCH_REPS"); do
  wait_quiet; prepare_cache
  { [ "$hwm_reset" = yes ] && echo 5 >/proc/"$ce_pid"/clear_refs; } 2>/dev/null || hwm_reset=no
  t0=$(ce_ticks); b0=$(busy_ticks)
  /usr/bin/time -f "$TIMEFMT" -o "$tmp/edge.$i.time" \
    "$bin/edge-agent" migrate --no-dedup --vmx "$tmp/vm/bench.vmx" --url "quic://127.0.0.1:$quic_port" \
      --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
      --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --name "bench-$i" --json \
      --receipt "$tmp/bench-$i.receipt.json" \
      >"$tmp/lift.$i.json" 2>"$tmp/edge.$i.log" \
    || { tail -3 "$tmp/lift.$i.json" "$tmp/edge.$i.log" "$tmp/cloud-endpoint.log" >&2; die "lift rep $i"; }
  t1=$(ce_ticks); b1=$(busy_ticks)
  summary=$(tail -n1 "$tmp/lift.$i.json")
  [ "$(jq -r .event <<<"$summary")" = summary ] || die "lift rep $i printed no summary: $summary"
  if [ "$i" = 1 ]; then
    # Correctness before speed: the registered disk must equal the source, byte for byte.
    vmdk=$tmp/datastore/bench-1/bench-1.vmdk
    qemu-img compare "$img" "$vmdk" >"$tmp/compare.log" 2>&1 \
      || { cat "$tmp/compare.log" >&2; die "qemu-img compare: the lifted disk differs from the source"; }
    log "qemu-img compare: $(tail -n1 "$tmp/compare.log")"
  fi
  read -r wall eu es erss <<<"$(read_time "$tmp/edge.$i.time")"
  jq -c --arg w "$wall" --arg cc "$eu $es" --arg sticks "$((t1 - t0))" --arg tck "$clk_tck" \
    --arg cr "$erss" --arg sr "$(ce_kib VmHWM)" --arg after "$(ce_kib VmRSS)" --arg reset "$hwm_reset" --arg busy "$((b1 - b0))" \
    '{wall:($w|tonumber), cpu_client:($cc|split(" ")|map(tonumber)|add),
      cpu_server:(($sticks|tonumber)/($tck|tonumber)), rss_client_kib:($cr|tonumber),
      rss_server_kib:($sr|tonumber), rss_server_per_rep:($reset=="yes"), rss_server_after_kib:($after|tonumber),
      wire_bytes, payload_bytes, zero_bytes, ratio, duration_secs}
     | .other_cpu = ((($busy|tonumber)/($tck|tonumber) - .cpu_client - .cpu_server)*100|round/100)' \
    <<<"$summary" >>"$tmp/lift.jsonl"
  log "lift rep $i: $(tail -n1 "$tmp/lift.jsonl")"
done

# --- the same disk in other source formats (issue: streamOptimized VMDK, compressed qcow2)
# Compressed sources cost a decompression per grain/cluster on the edge; report the
# logical rate of each beside the raw image's.
declare -A fmt_args=([streamOptimized.vmdk]="-O vmdk -o subformat=streamOptimized"
                     [compressed.qcow2]="-O qcow2 -c")
: >"$tmp/formats.jsonl"
for fmt in ${BENCH_FORMATS-streamOptimized.vmdk compressed.qcow2}; do
  src=${img%.img}.$fmt
  if [ ! -s "$src" ]; then
    log "converting the sample disk to $fmt (cached as $src)"
    # shellcheck disable=SC2086 # the options are word lists on purpose
    qemu-img convert -f raw ${fmt_args[$fmt]} "$img" "$src.part" && mv "$src.part" "$src"
  fi
  ln -sf "$src" "$tmp/vm/disk.$fmt"
  sed "s|sample-disk.img|disk.$fmt|" "$tmp/vm/bench.vmx" >"$tmp/vm/$fmt.vmx"
  for i in $(seq "$BENCH_REPS"); do
    wait_quiet; sync; [ "$cache" = drop ] && echo 3 >/proc/sys/vm/drop_caches || cat "$src" >/dev/null
    name="bench-${fmt%%.*}-$i"
    /usr/bin/time -f "$TIMEFMT" -o "$tmp/fmt.time" \
      "$bin/edge-agent" migrate --no-dedup --vmx "$tmp/vm/$fmt.vmx" --url "quic://127.0.0.1:$quic_port" \
        --user migrator@cloud.local --password 'VMware1!Cloud' --ca-bundle "$tmp/pki/ca.pem" \
        --cert "$tmp/pki/edge.pem" --key "$tmp/pki/edge.key" --name "$name" --json \
        --receipt "$tmp/$name.receipt.json" \
        >"$tmp/fmt.json" 2>"$tmp/fmt.log" || { tail -3 "$tmp/fmt.json" "$tmp/fmt.log" >&2; die "lift of $fmt"; }
    if [ "$i" = 1 ]; then
      qemu-img compare "$img" "$tmp/datastore/$name/$name.vmdk" >/dev/null 2>&1 \
        || die "qemu-img compare: the lift of $fmt differs from the source"
    fi
    read -r wall eu es erss <<<"$(read_time "$tmp/fmt.time")"
    jq -c --arg f "$fmt" --arg w "$wall" --arg cc "$eu $es" --arg r "$erss" \
      '{format:$f, wall:($w|tonumber), cpu_client:($cc|split(" ")|map(tonumber)|add), rss_client_kib:($r|tonumber), wire_bytes}' \
      <"$tmp/fmt.json" | tail -n1 >>"$tmp/formats.jsonl"
    log "lift of $fmt rep $i: $(tail -n1 "$tmp/formats.jsonl")"
  done
done

# --- aggregate (jq does the float maths), print, save ---------------------------------
jq -n --slurpfile scp "$tmp/scp.jsonl" --slurpfile lift "$tmp/lift.jsonl" \
  --argjson size "$size" --arg cache "$cache" --arg image "$img" --arg rev "$(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)" '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor]
                     else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  def agg: {reps: ., median_wall_s: (map(.wall) | median),
            logical_MBps: ($size / (map(.wall) | median) / 1e6),
            median_cpu_client_s: (map(.cpu_client) | median),
            median_cpu_server_s: (map(.cpu_server) | median),
            peak_rss_client_mib: (map(.rss_client_kib) | max / 1024),
            peak_rss_server_mib: (map(.rss_server_kib) | max / 1024),
            median_wire_bytes: (map(.wire_bytes) | if any(. == null) then null else median end),
            median_other_cpu_s: (map(.other_cpu) | median)};
  ($scp | agg) as $s | ($lift | agg) as $l
  | ($l.logical_MBps / $s.logical_MBps) as $x
  | {date: (now | todate), git: $rev, image: $image, logical_bytes: $size, cache: $cache,
     cores: '"$(nproc)"', scp: ($s + {cipher: $scp[0].cipher}),
     lift: ($l + {median_payload_bytes: ($lift | map(.payload_bytes) | median),
                  zero_bytes: $lift[0].zero_bytes, median_ratio: ($lift | map(.ratio) | median),
                  median_summary_duration_s: ($lift | map(.duration_secs) | median),
                  server_rss_after_each_mib: ($lift | map(.rss_server_after_kib / 1024 | round))}),
     lift_over_scp_rate: $x,
     targets: {rate_at_least_2_5x_scp: {value: $x, pass: ($x >= 2.5)},
               peak_rss_each_side_under_256mib: {client_mib: $l.peak_rss_client_mib,
                 server_mib: $l.peak_rss_server_mib,
                 pass: ($l.peak_rss_client_mib < 256 and $l.peak_rss_server_mib < 256)}}}
' >"$BENCH_DIR/results.json"
jq --slurpfile f "$tmp/formats.jsonl" --argjson size "$size" '
  def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
  .source_formats = ([{format: "raw", median_wall_s: .lift.median_wall_s, logical_MBps: .lift.logical_MBps}]
    + ($f | group_by(.format) | map({format: .[0].format, median_wall_s: (map(.wall) | median),
        logical_MBps: ($size / (map(.wall) | median) / 1e6), median_cpu_client_s: (map(.cpu_client) | median)})))
' "$BENCH_DIR/results.json" >"$tmp/r.json" && mv "$tmp/r.json" "$BENCH_DIR/results.json"

r=$BENCH_DIR/results.json
row() { # tool key
  jq -r --arg k "$2" '.[$k] | [.median_wall_s, .logical_MBps, .median_cpu_client_s, .median_cpu_server_s,
    .peak_rss_client_mib, .peak_rss_server_mib, (.median_wire_bytes // "n/a")] | @tsv' "$r" |
  { IFS=$'\t' read -r w mb cc cs rc rs wb
    printf -v cpu '%.2f / %.2f' "$cc" "$cs"; printf -v rss '%.1f / %.1f' "$rc" "$rs"
    printf '%-6s | %13.2f | %12.1f | %15s | %22s | %s\n' "$1" "$w" "$mb" "$cpu" "$rss" "$wb"; }
}
pf() { [ "$1" = true ] && echo PASS || echo FAIL; }
echo
echo "Gateway lift vs scp: $(jq -r '"\(.logical_bytes) bytes (\(.image)), \(.scp.reps|length) reps, medians, cache: \(.cache), git \(.git)"' "$r")"
echo "tool   | median wall s | logical MB/s | CPU s cli / srv | peak RSS MiB cli / srv | wire bytes"
echo "-------+---------------+--------------+-----------------+------------------------+-----------"
row scp scp
row lift lift
jq -r '"scp cipher: \(.scp.cipher); lift: payload \(.lift.median_payload_bytes) B, zero \(.lift.zero_bytes) B, ratio \(.lift.median_ratio*100|round/100), in-agent duration \(.lift.median_summary_duration_s*100|round/100) s"' "$r"
jq -r '"other CPU s on the machine during a run (noise; median): scp \(.scp.median_other_cpu_s), lift \(.lift.median_other_cpu_s)"
  + (if [.scp, .lift | .median_other_cpu_s] | max > 0.5 then "  <- NOISY: another job was running, rerun" else "" end)' "$r"
# Growth from lift to lift would mean memory the endpoint keeps: it runs for weeks.
jq -r '.lift.server_rss_after_each_mib | "cloud-endpoint RSS after each lift, MiB: \(map(tostring) | join(", "))"
  + (if length > 1 then " (\((.[-1] - .[0]) / (length - 1) | round) MiB more per lift)" else "" end)' "$r"
printf 'lift/scp logical rate: %.2fx\n' "$(jq .lift_over_scp_rate "$r")"
printf 'target "at least 2.5x scp'"'"'s rate":           %s (%.2fx)\n' \
  "$(pf "$(jq .targets.rate_at_least_2_5x_scp.pass "$r")")" "$(jq .targets.rate_at_least_2_5x_scp.value "$r")"
printf 'target "peak RSS of each side under 256 MiB": %s (edge %.1f, cloud %.1f MiB)\n' \
  "$(pf "$(jq .targets.peak_rss_each_side_under_256mib.pass "$r")")" \
  "$(jq .targets.peak_rss_each_side_under_256mib.client_mib "$r")" "$(jq .targets.peak_rss_each_side_under_256mib.server_mib "$r")"
echo
echo "source format          | median wall s | logical MB/s"
jq -r '.source_formats[] | [.format, .median_wall_s, .logical_MBps] | @tsv' "$r" |
  while IFS=$'\t' read -r f w mb; do printf '%-22s | %13.2f | %12.1f\n' "$f" "$w" "$mb"; done
echo "results: $r"
