#!/bin/sh
# Build (idempotently) a tiny Linux guest for the live-migration lab:
#   - a Debian cloud kernel (linux-image-cloud-amd64 -> its versioned linux-image-*),
#     fetched with `apt-get download` and unpacked with `dpkg-deb -x` (nothing installed)
#   - a gzipped newc initramfs with busybox-static, the virtio modules and /init
#
# Usage: tests/live/guest.sh [CACHE_DIR]
#   CACHE_DIR defaults to $LIVE_GUEST_DIR, else <repo>/target/live-guest.
#   Env: LIVE_GUEST_FORCE=1 rebuilds the initramfs; KERNEL_PKG overrides the
#   kernel meta package (default linux-image-cloud-amd64).
#
# Outputs in CACHE_DIR: vmlinuz, initrd.gz, guest.env (KERNEL=, INITRD=, APPEND=).
#
# Guest /init: mounts proc/sys/devtmpfs, insmods virtio modules, then loops forever
# (~4 times a second under TCG: period 0.15 s + the loop's own cost): N=N+1, prints "counter N" on ttyS0, writes to /dev/vda
#   record sector 8 + (N mod 4096):  "LIVEREC <N> <slot> <chk>\n"   (zero padded to 512 B)
#   header sector 0:                 "LIVEHDR <N> <chk>\n"          (written after the record)
#   chk = (N * 2654435761) mod 2^32. Both written with O_DIRECT + fsync.
# On boot it resumes from the header's N, so a disk stays consistent across reboots.
# Kernel command line options read by /init:
#   dirty=MIB   also rewrite MIB MiB of tmpfs memory in a loop (non-zero data)
#   period=SEC  sleep between counter steps (default 0.15)
#   scribble=N  also write one 64 KiB block per step at block 64 + (N*37 mod N) of /dev/vda
#               (4 MiB + ... : a disk that keeps changing, for replication): random data
#               starting "SCRIBBLE <N>", or zeros when N is a multiple of 5
# check-disk.py verifies the disk.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${1:-${LIVE_GUEST_DIR:-$repo/target/live-guest}}
kpkg=${KERNEL_PKG:-linux-image-cloud-amd64}
mkdir -p "$cache/debs"
cache=$(cd "$cache" && pwd)
# Tests run in parallel processes: one builds, the others wait for it and reuse the result.
if [ -z "${GUEST_SH_LOCKED:-}" ] && command -v flock >/dev/null; then
  export GUEST_SH_LOCKED=1
  exec flock "$cache/.lock" "$0" "$@"
fi

log() { echo "guest.sh: $*" >&2; }

# apt-get download, with `apt-get update` only if the package is unknown/unfetchable.
fetch() { # fetch PKG -> prints path of the .deb
    pkg=$1
    f=$(ls "$cache/debs/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$f" ]; then
        log "downloading $pkg"
        if ! (cd "$cache/debs" && apt-get download "$pkg" >/dev/null 2>"$cache/debs/apt.err"); then
            log "apt-get download $pkg failed, running apt-get update"
            apt-get update >/dev/null
            (cd "$cache/debs" && apt-get download "$pkg" >/dev/null 2>"$cache/debs/apt.err") || {
                cat "$cache/debs/apt.err" >&2; exit 1; }
        fi
        f=$(ls "$cache/debs/${pkg}_"*.deb | head -n1)
    fi
    echo "$f"
}

need() { command -v "$1" >/dev/null 2>&1 || { log "missing tool: $1"; exit 1; }; }
need apt-get; need dpkg-deb; need gzip

# ---- kernel -------------------------------------------------------------------------
meta=$(fetch "$kpkg")
# the meta package depends on exactly one versioned image, e.g. linux-image-6.1.0-56-cloud-amd64
kimg=$(dpkg-deb -f "$meta" Depends | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' | head -n1)
[ -n "$kimg" ] || { log "cannot find the versioned kernel in $meta's Depends"; exit 1; }
kdeb=$(fetch "$kimg")
kroot=$cache/kernel-root
if [ ! -f "$kroot/.done" ] || [ "$(cat "$kroot/.done")" != "$(basename "$kdeb")" ]; then
    log "unpacking $(basename "$kdeb")"
    rm -rf "$kroot"; mkdir -p "$kroot"
    dpkg-deb -x "$kdeb" "$kroot"
    basename "$kdeb" >"$kroot/.done"
fi
kver=$(ls "$kroot/lib/modules" | head -n1)
vmlinuz=$kroot/boot/vmlinuz-$kver
config=$kroot/boot/config-$kver

# ---- busybox --------------------------------------------------------------------------
bdeb=$(fetch busybox-static)
broot=$cache/busybox-root
if [ ! -f "$broot/.done" ] || [ "$(cat "$broot/.done")" != "$(basename "$bdeb")" ]; then
    rm -rf "$broot"; mkdir -p "$broot"
    dpkg-deb -x "$bdeb" "$broot"
    basename "$bdeb" >"$broot/.done"
fi

# ---- modules: whatever of virtio_pci/virtio_blk is =m, plus its depends= closure --------
moddir=$kroot/lib/modules/$kver
modfile() { find "$moddir/kernel" -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" | head -n1; }
order=""
add_mod() { # depth-first so dependencies come first (dash/bash/busybox sh have `local`)
    local m f deps d
    m=$(echo "$1" | tr - _)
    case " $order " in *" $m "*) return 0 ;; esac
    f=$(modfile "$m"); [ -n "$f" ] || f=$(modfile "$(echo "$m" | tr _ -)")
    [ -n "$f" ] || { log "module $m not found"; exit 1; }
    case "$f" in *.ko) ;; *) log "compressed module $f not supported"; exit 1 ;; esac
    deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$f" | head -n1 | sed 's/^depends=//' | tr ',' ' ')
    for d in $deps; do add_mod "$d"; done
    order="$order $m"
}
for opt in VIRTIO_PCI:virtio_pci VIRTIO_BLK:virtio_blk; do
    sym=${opt%%:*}; mod=${opt#*:}
    if grep -q "^CONFIG_$sym=m" "$config"; then add_mod "$mod";
    elif grep -q "^CONFIG_$sym=y" "$config"; then :;
    else log "kernel has no CONFIG_$sym"; exit 1; fi
done

# ---- /init --------------------------------------------------------------------------
init_script=$(cat <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -c /dev/ttyS0 ] && exec </dev/ttyS0 >/dev/ttyS0 2>&1
echo 1 >/proc/sys/kernel/printk 2>/dev/null
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
dirty=0; period=0.15; scribble=0
for w in $(cat /proc/cmdline); do
    case "$w" in dirty=*) dirty=${w#dirty=} ;; period=*) period=${w#period=} ;; scribble=*) scribble=${w#scribble=} ;; esac
done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || echo "no /dev/vda: counting without disk"
echo "guest up: uptime $(cut -d' ' -f1 /proc/uptime)s dirty=${dirty}MiB period=$period"
if [ "$dirty" -gt 0 ] 2>/dev/null; then
    # /dirty/src: dirty+1 MiB of a repeated random MiB; each pass copies dirty MiB of it into
    # /dirty/buf from a different 4 KiB-shifted offset, so every page of buf changes content
    # (non-zero, and visible to calc-dirty-rate's page-sampling, which hashes pages)
    mkdir -p /dirty
    mount -t tmpfs -o size=$((2 * dirty + 4))m tmpfs /dirty
    (
        dd if=/dev/urandom of=/dirty/chunk bs=1M count=1 2>/dev/null
        i=0; while [ $i -le $dirty ]; do cat /dirty/chunk; i=$((i+1)); done >/dirty/src
        rm -f /dirty/chunk
        p=0
        while :; do
            p=$((p+1))
            dd if=/dirty/src of=/dirty/buf bs=1M count=$dirty skip=$(( (p % 255 + 1) * 4096 )) \
                iflag=skip_bytes conv=notrunc 2>/dev/null
        done
    ) &
    renice -n 19 -p $! >/dev/null 2>&1
fi
n=0
if [ -b /dev/vda ]; then
    set -- $(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -n1 | tr -d '\000')
    if [ "${1:-}" = LIVEHDR ] && [ -n "${2:-}" ] && [ "$2" -ge 0 ] 2>/dev/null; then
        n=$2; echo "resuming from disk header: last counter $n"
    fi
fi
while :; do
    n=$((n+1))
    echo "counter $n"
    if [ -b /dev/vda ]; then
        chk=$(( (n * 2654435761) % 4294967296 ))
        slot=$((n % 4096))
        printf 'LIVEREC %d %d %d\n' $n $slot $chk | dd of=/dev/vda bs=512 seek=$((8 + slot)) count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null || echo "record write $n failed"
        printf 'LIVEHDR %d %d\n' $n $chk | dd of=/dev/vda bs=512 seek=0 count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null || echo "header write $n failed"
        if [ "$scribble" -gt 0 ] 2>/dev/null; then
            if [ $((n % 5)) = 0 ]; then
                head -c 65536 /dev/zero >/tmp/block
            else
                head -c 65536 /dev/urandom >/tmp/block
                printf 'SCRIBBLE %d\n' $n | dd of=/tmp/block conv=notrunc 2>/dev/null
            fi
            dd if=/tmp/block of=/dev/vda bs=65536 seek=$((64 + (n * 37) % scribble)) count=1 conv=notrunc,fsync oflag=direct 2>/dev/null || echo "scribble write $n failed"
        fi
    fi
    sleep $period
done
EOF
)

# stamp = everything the initramfs depends on; rebuild only if it changed
stamp=$(printf '%s\n%s\n%s\n%s\n' "$(basename "$kdeb")" "$(basename "$bdeb")" "$order" "$init_script" | cksum | cut -d' ' -f1)
if [ "${LIVE_GUEST_FORCE:-0}" != 1 ] && [ -f "$cache/initrd.gz" ] && [ -f "$cache/vmlinuz" ] \
   && [ "$(cat "$cache/stamp" 2>/dev/null)" = "$stamp" ]; then
    log "up to date"
else
    st=$cache/initramfs
    rm -rf "$st"; mkdir -p "$st/bin" "$st/dev" "$st/proc" "$st/sys" "$st/tmp" "$st/etc" "$st/lib/modules"
    cp "$broot/bin/busybox" "$st/bin/busybox"
    ln -s busybox "$st/bin/sh"
    for m in $order; do cp "$(modfile "$m")" "$st/lib/modules/$m.ko"; done
    echo $order >"$st/etc/modules.order"
    printf '%s\n' "$init_script" >"$st/init"
    chmod 755 "$st/init" "$st/bin/busybox"
    # The kernel opens /dev/console for init's stdio before /init runs; the newc writer
    # below always adds that node (cpio(1) can only add it when we may mknod, i.e. as root).
    tmp=$cache/initrd.cpio.tmp
    if command -v cpio >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        mknod -m 600 "$st/dev/console" c 5 1
        (cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$tmp"
    elif command -v python3 >/dev/null 2>&1; then
        python3 - "$st" "$tmp" <<'PY'
import os, stat, sys
root, out = sys.argv[1], sys.argv[2]
ino = [300000]
def entry(f, name, mode, data=b"", rdev=(0, 0), nlink=1):
    ino[0] += 1
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
    f.write(hdr.encode() + nb + b"\0" * (-(110 + len(nb)) % 4))
    f.write(data + b"\0" * (-len(data) % 4))
with open(out, "wb") as f:
    names = []
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            names.append(os.path.relpath(os.path.join(d, n), root))
    for name in sorted(names):
        p = os.path.join(root, name); st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            entry(f, name, st.st_mode, os.readlink(p).encode())
        elif stat.S_ISDIR(st.st_mode):
            entry(f, name, st.st_mode, nlink=2)
        elif stat.S_ISREG(st.st_mode):
            entry(f, name, st.st_mode, open(p, "rb").read())
    if not os.path.exists(os.path.join(root, "dev/console")):
        entry(f, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    entry(f, "TRAILER!!!", 0, nlink=1)
PY
    else
        # last resort: the busybox we just unpacked can write newc archives too
        [ "$(id -u)" = 0 ] && mknod -m 600 "$st/dev/console" c 5 1
        (cd "$st" && find . | LC_ALL=C sort | "$broot/bin/busybox" cpio -o -H newc -R 0:0) >"$tmp" 2>/dev/null
    fi
    gzip -9n <"$tmp" >"$cache/initrd.gz.tmp"
    rm -f "$tmp"
    mv "$cache/initrd.gz.tmp" "$cache/initrd.gz"
    cp "$vmlinuz" "$cache/vmlinuz"
    echo "$stamp" >"$cache/stamp"
    log "built initramfs ($(wc -c <"$cache/initrd.gz") bytes, modules:$order)"
fi

append="console=ttyS0 panic=-1 loglevel=4"
cat >"$cache/guest.env" <<EOF
KERNEL=$cache/vmlinuz
INITRD=$cache/initrd.gz
APPEND="$append"
KERNEL_VERSION=$kver
KERNEL_DEB=$kdeb
BUSYBOX_DEB=$bdeb
MODULES="$order"
EOF
echo "kernel:    $cache/vmlinuz ($kver)"
echo "initrd:    $cache/initrd.gz"
echo "append:    $append   (add dirty=MIB to dirty memory, period=SEC for the loop)"
echo "env file:  $cache/guest.env"
echo "modules:  $order"
echo "example:   qemu-system-x86_64 -accel tcg -m 256 -smp 1 -nodefaults -display none -no-reboot \\"
echo "             -kernel $cache/vmlinuz -initrd $cache/initrd.gz -append '$append' \\"
echo "             -serial stdio -drive if=none,id=d0,file=disk.qcow2,format=qcow2 -device virtio-blk-pci,drive=d0"
echo "check:     $here/check-disk.py disk.qcow2"
