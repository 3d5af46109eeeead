#!/usr/bin/env bash
# The runtime root file system the cloud endpoint's image stands on, made from this
# machine's own Debian mirror (no container registry is needed, none is reachable):
# a minbase debootstrap, QEMU and qemu-img for the endpoint's hosts, OVMF for EFI guests,
# curl for the health check, an unprivileged user. Imported as gateway-base:TAG, where TAG
# is a digest of this file and the Debian release, so it is built once per machine and
# again only when this recipe changes.
#
# Usage: deploy/base.sh            prints the image name (gateway-base:TAG) on stdout
#        FORCE=1 deploy/base.sh    rebuilds even if the image exists
# Needs root (debootstrap, chroot), debootstrap and docker.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
say() { echo "deploy/base.sh: $*" >&2; }
die() { say "$*"; exit 1; }

# shellcheck disable=SC1091
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || die "cannot tell the Debian release from /etc/os-release"
arch=$(dpkg --print-architecture)
tag=$( { cat "$0"; echo "$suite $arch"; } | sha256sum | cut -c1-12)
image=gateway-base:$tag

if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
  echo "$image"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "building $image needs root (debootstrap and chroot)"
command -v debootstrap >/dev/null || {
  say "installing debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

# The machine's Debian mirror, as apt itself is configured (deb822 .sources or one-line
# .list files): the first source of the main archive that serves $suite.
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # One stanza per paragraph: print the URI of a stanza whose Suites name $suite.
    awk -v suite="$suite" '
      /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri=""; ok=0; next }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok=1 }
      END { if (uri != "" && ok) print uri }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v suite="$suite" '$1 == "deb" && $0 !~ /\[/ && $3 == suite { print $2 } $1 == "deb" && $2 ~ /^\[/ && $4 == suite { print $3 }' "$f"
  done
}
url=$(mirror | head -n1)
[ -n "$url" ] || die "no apt source for $suite in /etc/apt/sources.list or /etc/apt/sources.list.d/"
say "building $image: debootstrap $suite ($arch) from the machine's mirror"

root=$(mktemp -d /var/tmp/gateway-base.XXXXXX)
cleanup() {
  umount -l "$root/proc" 2>/dev/null || true
  umount -l "$root/dev" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
start=$(date +%s)

debootstrap --variant=minbase --include=ca-certificates,curl "$suite" "$root" "$url" >&2 \
  || die "debootstrap failed (see above)"

# QEMU from the backports, as tests/setup.sh installs it on the host: the endpoint is
# tested against that version. Falls back to the release's own where there is none.
cat > "$root/etc/apt/sources.list" <<LIST
deb $url $suite main
deb $url $suite-updates main
deb $url $suite-backports main
LIST
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
in_root() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
in_root apt-get update -qq >&2
qemu=(qemu-system-x86 qemu-utils ovmf)
if ! in_root apt-get install -y -qq --no-install-recommends -t "$suite-backports" "${qemu[@]}" >&2; then
  in_root apt-get install -y -qq --no-install-recommends "${qemu[@]}" >&2
fi
# The endpoint's user (fixed ids, so volumes keep their owner across rebuilds).
in_root groupadd --gid 10001 gateway
in_root useradd --no-create-home --uid 10001 --gid 10001 --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway
in_root apt-get clean
umount -l "$root/proc" "$root/dev"

# What a runtime never reads.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/* "$root"/tmp/* "$root"/var/tmp/*
# The mirror of the machine that built it is no business of the image.
: > "$root/etc/apt/sources.list"

tar -C "$root" --numeric-owner -c . \
  | docker import --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
say "built $image in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec))"
echo "$image"
