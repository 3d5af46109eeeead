#!/usr/bin/env bash
# Installs everything the workspace's tests need, so that no test finds a tool missing (a
# test whose tool is missing fails and says how to install it; it never passes untested).
# Idempotent: what is already there is kept. Debian 12 (bookworm), as root for apt-get.
#
#   qemu-img, qemu-io      qemu-utils            disk images, compare/check/convert
#   mkfs.ext4              e2fsprogs             filesystems inside test disks
#   qemu-system-x86_64     qemu-system-x86       test boots (power.rs), live migration (live.rs)
#   OVMF (EFI firmware)    ovmf                  booting EFI guests
#   ip, tc, iptables, ping iproute2, iptables,   the emulated WAN link (wan.rs)
#                          iputils-ping
#   dpkg-deb, gzip, cpio   dpkg, gzip, cpio      the live tests' guest (tests/live/guest.sh)
#   python3 + venv         python3-venv          the vSphere SDK test (tests/vapi/venv.sh)
#   openssl                openssl               thumbprints checked against openssl (certs)
#   promtool               prometheus            metrics exposition checked (metrics.rs)
#   chromium               chromium              the dashboard in a headless browser (dashboard.rs)
#   postgres, initdb       postgresql            the inventory on PostgreSQL (inventory::store)
#   cargo-nextest          crates.io             the test runner
#   user gateway-qemu      useradd               QEMU's own user when the endpoint is root
#   debootstrap            debootstrap           the containers' Debian base (deploy/base.sh)
#   docker-compose         docker-compose        the compose deployment (containers.rs); the
#                                                Docker engine itself is the machine's
#
# Usage: tests/setup.sh        (tests/run.sh calls it before the tests)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

say() { echo "tests/setup.sh: $*" >&2; }
die() { say "$*"; exit 1; }

apt_install() { # apt_install [-t RELEASE] PKG...
  [ "$(id -u)" = 0 ] || die "missing $*: run this script as root, or install them with: sudo apt-get install $*"
  command -v apt-get >/dev/null || die "missing $*, and there is no apt-get to install them: install them by hand"
  if [ -z "${APT_UPDATED:-}" ]; then
    apt-get update -qq
    APT_UPDATED=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

need=()
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v ip >/dev/null && command -v tc >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v ping >/dev/null || need+=(iputils-ping)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v gzip >/dev/null || need+=(gzip)
command -v cpio >/dev/null || need+=(cpio)
command -v flock >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
[ -e /usr/share/OVMF/OVMF_CODE.fd ] || [ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
if [ ${#need[@]} -gt 0 ]; then
  apt_install "${need[@]}"
fi

# QEMU for test boots and live migrations. The qemu-utils this image comes with (10.0) is
# a bookworm backport: plain apt would pull qemu-system 7.2 and try to replace it, so
# qemu-system-x86 comes from bookworm-backports too, keeping both at one version.
if ! command -v qemu-system-x86_64 >/dev/null; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ] && ! grep -q bookworm-backports "$src"; then
    sed -i 's/^Suites: bookworm bookworm-updates$/Suites: bookworm bookworm-updates bookworm-backports/' "$src"
    APT_UPDATED=
  fi
  # The installed qemu-utils' version, read whole before matching: `grep -q` in a pipe
  # under pipefail fails at random when apt-cache gets SIGPIPE.
  utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  if [[ "$utils" == *bpo* ]]; then
    apt_install -t bookworm-backports "qemu-system-x86=$utils"
  else
    apt_install qemu-system-x86
  fi
fi

# The unprivileged user the cloud endpoint runs each VM's QEMU as when it runs as root
# (docs/hosts.md): power.rs and hardening.rs boot VMs as root.
if [ "$(id -u)" = 0 ] && ! getent passwd gateway-qemu >/dev/null; then
  say "creating the user gateway-qemu (QEMU's, for an endpoint running as root)"
  useradd --system --no-create-home --shell /usr/sbin/nologin gateway-qemu
fi

command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# The vSphere Automation SDK for Python, from PyPI, in target/vapi-venv (vapi.rs reuses it).
"$here/vapi/venv.sh" >/dev/null || die "tests/vapi/venv.sh could not make the SDK's virtualenv (see above)"
say "ready"
