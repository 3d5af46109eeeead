#!/usr/bin/env python3
"""How long the guest stopped counting across a live migration, as its consoles show it.

  console-gap.py --src SRC_SERIAL_LOG (--dst DST_SERIAL_LOG | --dst-find DIR NAME) [--timeout S]

Polls both console logs every 5 ms and notes when each `counter N` line appeared. It ends
when the destination has printed --lines counters (or at --timeout, or SIGTERM) and
prints one JSON line:
  gap_ms          first destination counter seen - last source counter seen
  interval_ms     median interval between source counters before the switch (the loop's period)
  pause_est_ms    gap_ms - interval_ms: the guest-visible pause, to about one interval
  src_last, dst_first, continuous (dst_first is src_last + 1)
QEMU's `downtime` is measured on the source up to the moment it handed the last bytes to
its socket; this one includes the bytes in flight and starting the destination, and is the
same measurement for a direct migration and one through the gateway.

--dst-find DIR NAME: the destination console is the file NAME found anywhere under DIR (the
cloud endpoint keeps it in a staging folder and moves it at the commit; an open file
follows the rename).
"""
import argparse, json, os, re, signal, statistics, sys, time

LINE = re.compile(rb"^counter (\d+)\r?$")


class Tail:
    def __init__(self):
        self.f, self.buf, self.seen = None, b"", []     # seen: (t, n)

    def poll(self, path):
        if self.f is None:
            if not path or not os.path.exists(path):
                return
            self.f = open(path, "rb")
        d = self.f.read()
        if not d:
            return
        t = time.monotonic()
        self.buf += d
        *lines, self.buf = self.buf.split(b"\n")
        for l in lines:
            m = LINE.match(l.strip(b"\0"))
            if m:
                self.seen.append((t, int(m.group(1))))


def find(root, name):
    for d, _, files in os.walk(root):
        if name in files:
            return os.path.join(d, name)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--dst")
    ap.add_argument("--dst-find", nargs=2, metavar=("DIR", "NAME"))
    ap.add_argument("--lines", type=int, default=3, help="destination counters to wait for")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    src, dst = Tail(), Tail()
    dst_path = a.dst
    end = time.monotonic() + a.timeout
    last_find = 0.0
    while not stop and time.monotonic() < end and len(dst.seen) < a.lines:
        src.poll(a.src)
        if dst_path is None and a.dst_find and time.monotonic() - last_find > 0.2:
            last_find = time.monotonic()
            dst_path = find(*a.dst_find)
        dst.poll(dst_path)
        time.sleep(0.005)
    r = {"src_counters": len(src.seen), "dst_counters": len(dst.seen)}
    if src.seen and dst.seen:
        t_src, n_src = src.seen[-1]
        t_dst, n_dst = dst.seen[0]
        tail = src.seen[-40:]
        ivals = [b[0] - a_[0] for a_, b in zip(tail, tail[1:])]
        ival = statistics.median(ivals) if ivals else 0.0
        r.update({"src_last": n_src, "dst_first": n_dst, "continuous": n_dst == n_src + 1,
                  "gap_ms": round((t_dst - t_src) * 1000, 1), "interval_ms": round(ival * 1000, 1),
                  "pause_est_ms": round((t_dst - t_src - ival) * 1000, 1)})
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
