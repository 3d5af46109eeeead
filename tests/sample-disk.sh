#!/usr/bin/env bash
# Makes a realistic sample VM disk: an ext4 file system filled with real files
# from this machine (docs, man pages, Perl, Vim, locales, Python, binaries),
# the rest zeros. Usage: tests/sample-disk.sh OUT.img [SIZE] [small]
#   SIZE   default 1G (the benchmark's image, ~520 MiB of file data)
#   small  copy only docs, Vim, Perl and Python (~230 MiB, ~10k files) for a quick
#          demo (mkfs.ext4 -d takes half a minute on the ~30k files of the man pages)
set -euo pipefail
out=${1:?usage: sample-disk.sh OUT.img [SIZE] [small]}
size=${2:-1G}
mode=${3:-full}
command -v mkfs.ext4 >/dev/null || { apt-get update -qq && apt-get install -y -qq e2fsprogs >/dev/null; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
if [ "$mode" = small ]; then
  dirs=(/usr/share/doc /usr/share/vim /usr/share/perl /usr/lib/python3.11)
else
  dirs=(/usr/share/doc /usr/share/man /usr/share/perl /usr/share/vim /usr/share/i18n
        /usr/share/terminfo /usr/lib/python3.11 /usr/bin)
fi
# The files fill at most 70 % of the disk (ext4 needs the rest): a folder that would
# take more is left out, so a small SIZE gives a smaller file set instead of a failure.
limit=$(($(numfmt --from=iec "$size") * 7 / 10))
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  mkdir -p "$stage$(dirname "$d")"
  cp -a "$d" "$stage$(dirname "$d")/" 2>/dev/null || true
  if [ "$(du -sb "$stage" | cut -f1)" -gt "$limit" ]; then rm -rf "${stage:?}$d"; fi
done
rm -f "$out"
qemu-img create -q -f raw "$out" "$size"
mkfs.ext4 -q -F -L sample -d "$stage" "$out"
