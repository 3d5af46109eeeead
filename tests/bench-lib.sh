# Shell functions the benchmark scripts share; source it: . "$root/tests/bench-lib.sh"

# write_vmx FILE NAME DISK [MAC]: the .vmx of a one-disk VM called NAME (2 vCPUs, 2 GiB),
# its disk DISK (a path relative to the .vmx's folder) on a pvscsi controller; with MAC, a
# vmxnet3 NIC on "VM Network" with that address.
write_vmx() {
  local file=$1 name=$2 disk=$3 mac=${4:-}
  cat >"$file" <<VMX
.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "$name"
guestOS = "debian12-64"
numvcpus = "2"
memsize = "2048"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "$disk"
VMX
  if [ -n "$mac" ]; then
    cat >>"$file" <<VMX
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "$mac"
VMX
  fi
}

# sample_disk SIZE [FILL]: prints the path of the realistic sample disk of SIZE
# (tests/sample-disk.sh: real files in ext4, the rest zeros), made once and cached in
# $BENCH_DIR; 1G is the one every benchmark shares. Under 1G the smaller file set is used,
# so that it fits. With FILL (a percentage), copies of the file set fill that share of the
# disk (sample-disk.sh's FILL): a fuller disk, cached under its own name.
sample_disk() {
  local size=$1 fill=${2:-} img mode=full
  mkdir -p "$BENCH_DIR"
  if [ "$size" = 1G ] && [ -z "$fill" ]; then
    img=$BENCH_DIR/sample-disk.img
  else
    img=$BENCH_DIR/sample-disk-$size${fill:+-fill$fill}.img
  fi
  if [ ! -s "$img" ]; then
    [ "$(numfmt --from=iec "$size")" -lt $((1 << 30)) ] && mode=small
    log "making $img ($size, $mode file set${fill:+, $fill % of it data}; takes a minute or two)"
    # Built under a temporary name, so an interrupted run never leaves a half image cached.
    bash "$root/tests/sample-disk.sh" "$img.part" "$size" "$mode" $fill >&2
    mv "$img.part" "$img"
  fi
  echo "$img"
}
