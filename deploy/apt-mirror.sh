#!/usr/bin/env bash
# Prints the machine's Debian mirror for its release, as apt itself is configured (deb822
# .sources or one-line .list files): the first source of the main archive that serves
# the release. deploy/build-images.sh hands it to the PostgreSQL image's build, which
# installs Debian's package from it; no host name is written in the repository.
#
# The same reading as deploy/base.sh's (kept there as well: the base's tag is a digest
# of base.sh, and a change to it would rebuild the base on every machine).
#
# Usage: deploy/apt-mirror.sh     prints "URL SUITE" (e.g. "http://deb.debian.org/debian bookworm")
set -euo pipefail
# shellcheck disable=SC1091
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$suite" ] || { echo "deploy/apt-mirror.sh: cannot tell the Debian release from /etc/os-release" >&2; exit 1; }

mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
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
[ -n "$url" ] || { echo "deploy/apt-mirror.sh: no apt source for $suite in /etc/apt/sources.list or /etc/apt/sources.list.d/" >&2; exit 1; }
echo "$url $suite"
