#!/usr/bin/env bash
# Makes the virtualenv the vAPI test runs the vSphere Automation SDK for Python in, with
# the pinned requirements.txt, and prints its python. Kept under target/vapi-venv (or
# the folder given as $1), so later runs reuse it; rebuilt when requirements.txt changes. On a clean machine
# (CI runs as root) python3-venv is installed with apt-get if it is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${1:-$here/../../target/vapi-venv}
mkdir -p "$root"
root=$(cd "$root" && pwd)
venv=$root/env
req=$here/requirements.txt

# Two test runs at once must not build the same venv over each other.
exec 9>"$root/lock"
flock 9

if [ -x "$venv/bin/python" ] && cmp -s "$req" "$venv/requirements.txt"; then
  echo "$venv/bin/python"
  exit 0
fi

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
  else
    echo "python3 with the venv module is needed for the vAPI test: install python3-venv (apt-get install python3-venv, or run tests/setup.sh as root)" >&2
    exit 1
  fi
fi

rm -rf "$venv"
python3 -m venv "$venv" >&2
if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req" >&2; then
  rm -rf "$venv"
  echo "could not install the vSphere SDK from PyPI into $venv (see pip's output above): the vAPI test needs network access to PyPI" >&2
  exit 1
fi
# Written last: a venv whose install was cut short is rebuilt next time.
cp "$req" "$venv/requirements.txt"
echo "$venv/bin/python"
