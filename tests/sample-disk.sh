#!/usr/bin/env bash
# Makes a realistic sample VM disk: an ext4 file system filled with real files
# from this machine (docs, man pages, Perl, Vim, locales, Python, binaries),
# the rest zeros. Usage: tests/sample-disk.sh OUT.img [SIZE] [small|full] [FILL]
#   SIZE   default 1G (the benchmark's image, ~520 MiB of file data)
#   small  copy only docs, Vim, Perl and Python (~230 MiB, ~10k files) for a quick
#          demo (mkfs.ext4 -d takes half a minute on the ~30k files of the man pages)
#   FILL   percent of the disk that holds data (1-85; default: the file set alone).
#          The file set of this machine is under 1 GiB, so a 10 GiB disk is 90 % zeros;
#          a legacy VM's disk rarely is, and a benchmark that compares anything with a
#          cold lift is bound by how little a cold lift of an empty disk sends. FILL adds
#          copies of the file set (as tar archives, which compress like the files) until
#          FILL % of the disk holds data. Each copy starts 512 bytes further into its
#          archive than the one before, so no 64 KiB chunk of a copy repeats one of another
#          copy: compression and deduplication find no more than on a real disk.
set -euo pipefail
out=${1:?usage: sample-disk.sh OUT.img [SIZE] [small|full] [FILL]}
size=${2:-1G}
mode=${3:-full}
fill=${4:-}
if [ -n "$fill" ] && { ! [[ $fill =~ ^[0-9]+$ ]] || [ "$fill" -lt 1 ] || [ "$fill" -gt 85 ]; }; then
  echo "sample-disk.sh: FILL=$fill is not a percentage from 1 to 85 (ext4 needs the rest)" >&2
  exit 2
fi
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
bytes=$(numfmt --from=iec "$size")
limit=$((bytes * 7 / 10))
for d in "${dirs[@]}"; do
  [ -d "$d" ] || continue
  mkdir -p "$stage$(dirname "$d")"
  cp -a "$d" "$stage$(dirname "$d")/" 2>/dev/null || true
  if [ "$(du -sb "$stage" | cut -f1)" -gt "$limit" ]; then rm -rf "${stage:?}$d"; fi
done
if [ -n "$fill" ]; then
  # Copies of the file set as archives in /copies, the last one cut to what is left.
  want=$((bytes * fill / 100))
  mkdir "$stage/copies"
  shift_dir=$(mktemp -d)
  trap 'rm -rf "$stage" "$shift_dir"' EXIT
  for ((i = 1; ; i++)); do
    have=$(du -sb "$stage" | cut -f1)
    [ "$have" -lt "$want" ] || break
    # The leading member shifts the copy by i * 512 bytes (tar rounds members to 512).
    head -c $((i * 512 - 1)) /usr/share/common-licenses/GPL-3 >"$shift_dir/shift"
    # head ends tar's pipe at the size wanted: tar's SIGPIPE is expected then.
    (tar -cf - -C "$shift_dir" shift -C "$stage" --exclude=./copies . 2>/dev/null || true) |
      head -c $((want - have)) >"$stage/copies/set-$i.tar"
    [ -s "$stage/copies/set-$i.tar" ] || { echo "sample-disk.sh: tar of the file set failed" >&2; exit 1; }
  done
fi
rm -f "$out"
qemu-img create -q -f raw "$out" "$size"
mkfs.ext4 -q -F -L sample -d "$stage" "$out"
