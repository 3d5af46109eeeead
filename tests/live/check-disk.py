#!/usr/bin/env python3
"""Verify the disk written by the live-migration lab guest (tests/live/guest.sh).

Layout (512-byte sectors, zero padded text):
  sector 0:                    "LIVEHDR <N> <chk>\\n"          last counter N, written after its record
  sector 8 + (n mod 4096):     "LIVEREC <n> <slot> <chk>\\n"   chk = n * 2654435761 mod 2^32

A consistent disk with header N has, for every n in [max(1, N-4095), N], the record n in
its slot; slot (N+1) mod 4096 may instead already hold N+1 (record written, header not yet);
slots never written are all zero. Anything else (wrong counter, bad checksum, torn or
garbage sector, record newer than the header + 1) is an error.

Usage: check-disk.py IMAGE [--min-counter N] [--format raw|qcow2|...] [--json]
Non-raw images are read with `qemu-img dd` (only the first 4104 sectors).
Exit status 0 if intact, 1 if not.
"""
import argparse, json, os, subprocess, sys, tempfile

SLOTS, BASE, SECTOR = 4096, 8, 512
MUL, MOD = 2654435761, 1 << 32


def chk(n):
    return (n * MUL) % MOD


def read_area(image, fmt):
    need = (BASE + SLOTS) * SECTOR
    if fmt is None:
        try:
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", image],
                check=True, capture_output=True, text=True).stdout)
            fmt = info["format"]
        except (OSError, subprocess.CalledProcessError):
            fmt = "raw"  # no qemu-img: assume raw
    if fmt == "raw":
        with open(image, "rb") as f:
            data = f.read(need)
    else:
        with tempfile.TemporaryDirectory() as td:
            out = os.path.join(td, "area.raw")
            subprocess.run(["qemu-img", "dd", "-U", "-f", fmt, "-O", "raw", "bs=%d" % SECTOR,
                            "count=%d" % (BASE + SLOTS), "if=" + image, "of=" + out],
                           check=True, capture_output=True)
            with open(out, "rb") as f:
                data = f.read(need)
    return fmt, data.ljust(need, b"\0")


def parse(sector, kind):
    """-> None for an all-zero sector, a tuple of ints, or a string describing the damage."""
    if sector == b"\0" * SECTOR:
        return None
    text, nl, rest = sector.partition(b"\n")
    if not nl or rest.strip(b"\0"):
        return "garbage/torn sector %r" % sector[:60]
    f = text.decode("ascii", "replace").split()
    try:
        if f[0] != kind:
            raise ValueError
        vals = tuple(int(x) for x in f[1:])
    except (ValueError, IndexError):
        return "unparsable %r" % text[:60]
    if kind == "LIVEHDR" and (len(vals) != 2 or vals[1] != chk(vals[0])):
        return "bad header %r" % text
    if kind == "LIVEREC" and (len(vals) != 3 or vals[1] != vals[0] % SLOTS or vals[2] != chk(vals[0])):
        return "bad record %r" % text
    return vals


def check(data):
    errors = []
    hdr = parse(data[:SECTOR], "LIVEHDR")
    recs = {}
    for s in range(SLOTS):
        off = (BASE + s) * SECTOR
        r = parse(data[off:off + SECTOR], "LIVEREC")
        if isinstance(r, str):
            errors.append("slot %d: %s" % (s, r))
        elif r is not None:
            if r[1] != s:
                errors.append("slot %d holds record for slot %d" % (s, r[1]))
            recs[s] = r[0]
    if isinstance(hdr, str):
        errors.append("header: " + hdr)
        return None, recs, errors
    if hdr is None:
        if recs and recs != {1: 1}:   # record 1 written, header not yet: fine
            errors.append("no header but %d records" % len(recs))
        return 0, recs, errors
    last = hdr[0]
    for s in range(SLOTS):
        # the newest n <= last with n % SLOTS == s, or 0 if none
        exp = last - ((last - s) % SLOTS)
        got = recs.get(s)
        if exp < 1:
            exp = None
        if got == exp:
            continue
        if got == last + 1 and s == (last + 1) % SLOTS:
            continue  # record written, header not yet
        errors.append("slot %d: expected %s, found %s" % (s, exp, got))
    return last, recs, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--format", help="image format (default: qemu-img info)")
    ap.add_argument("--min-counter", type=int, default=None,
                    help="also fail unless the header's last counter is >= this")
    ap.add_argument("--json", action="store_true", help="print a JSON result line")
    a = ap.parse_args()
    fmt, data = read_area(a.image, a.format)
    last, recs, errors = check(data)
    if a.min_counter is not None and (last or 0) < a.min_counter:
        errors.append("last counter %s < required %d" % (last, a.min_counter))
    ok = not errors
    newest = max(recs.values()) if recs else 0
    if a.json:
        print(json.dumps({"image": a.image, "format": fmt, "ok": ok, "last_counter": last,
                          "records": len(recs), "newest_record": newest, "errors": errors[:50]}))
    else:
        for e in errors[:20]:
            print("ERROR", e)
        if len(errors) > 20:
            print("ERROR ... %d more" % (len(errors) - 20))
        print("%s: %s (%s), last counter %s, %d records, newest record %d" %
              (a.image, "INTACT" if ok else "CORRUPT", fmt, last, len(recs), newest))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
