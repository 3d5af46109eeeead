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
