#!/usr/bin/env python3
"""Reference live migration (RAM + non-shared storage) between two local QEMU processes,
done the way libvirt does it: NBD export on the destination, blockdev-mirror on the source,
then migrate; the destination starts with -S and only runs after the mirror has been
finalised. Python 3 stdlib only.

Every data path goes to an address this script chooses (unix sockets in the work dir, or
tcp 127.0.0.1 ports with --transport tcp), so a tunnel can be put in between; --via-proxy
puts a byte-counting forwarding proxy there and checks that it works through it.

  tests/live/direct-migrate.py                    # unix sockets, direct
  tests/live/direct-migrate.py --via-proxy        # through the counting proxy
  tests/live/direct-migrate.py --dirty 64         # guest rewrites 64 MiB of RAM in a loop
  tests/live/direct-migrate.py --transport tcp --switchover after

The gateway's benchmark (tests/live-bench.sh) runs it as the no-tunnel reference, with the
same QEMU command line the gateway's source uses (--edge-agent: `edge-agent qemu-command`
from a .vmx; the destination gets the same plus -incoming defer -S), each QEMU under a
command prefix (--src-prefix/--dst-prefix, e.g. `ip netns exec wan-cloud`), the
destination listening on --listen-host (TCP) and ports of its choice, and a base image to
start the source from (--src-image). The last line is always `RESULT-JSON: {...}`.

Exit status 0 if the migration completed, the counter continued without reset on the
destination and check-disk.py found the destination disk intact past the switchover.
"""
import argparse, json, os, re, shlex, shutil, signal, socket, subprocess, sys, tempfile
import threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
T0 = time.monotonic()
QMP_LOG = []          # (t, side, kind, text)
PROCS = []


def now():
    return time.monotonic() - T0


def say(msg):
    print("[%7.3f] %s" % (now(), msg), flush=True)


# ---------------------------------------------------------------- QMP client
class QMPError(Exception):
    pass


class QMP:
    def __init__(self, side, path, timeout=30):
        self.side, self.events, self.buf, self.id = side, [], b"", 0
        end = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self._read()                                   # greeting
        self.cmd("qmp_capabilities", log=False)

    def _read(self, timeout=None):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise QMPError("%s: QMP connection closed" % self.side)
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _take(self, msg):
        if "event" in msg:
            msg["_t"] = now()
            self.events.append(msg)
            QMP_LOG.append((now(), self.side, "event", "%s %s" % (
                msg["event"], json.dumps(msg.get("data", {}), sort_keys=True))))
            return True
        return False

    def cmd(self, execute, log=True, check=True, **args):
        self.id += 1
        req = {"execute": execute, "id": self.id}
        if args:
            req["arguments"] = args
        t = now()
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            msg = self._read()
            if self._take(msg):
                continue
            if msg.get("id") == self.id:
                break
        if log:
            res = msg.get("return", msg.get("error"))
            txt = json.dumps(res, sort_keys=True)
            QMP_LOG.append((t, self.side, "cmd", "%s %s -> %s%s (%.0f ms)" % (
                execute, json.dumps(args, sort_keys=True) if args else "",
                "" if "return" in msg else "ERROR ", txt if len(txt) < 300 else txt[:300] + "...",
                (now() - t) * 1000)))
        if "error" in msg:
            if check:
                raise QMPError("%s: %s failed: %s" % (self.side, execute, msg["error"]))
            return msg
        return msg["return"]

    def pump(self, timeout):
        """Read messages until one event arrived or timeout seconds passed."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                msg = self._read(left)
            except socket.timeout:
                return
            if self._take(msg):
                return

    def wait_event(self, name, timeout=60, pred=lambda e: True, since=0):
        end = time.monotonic() + timeout
        while True:
            for e in self.events[since:]:
                if (name == "*" or e["event"] == name) and pred(e):
                    return e
            if time.monotonic() > end:
                raise QMPError("%s: timeout waiting for %s" % (self.side, name))
            self.pump(min(0.2, max(0.01, end - time.monotonic())))


# ---------------------------------------------------------------- counting proxy
class Proxy:
    """Forward each connection on `listen` to `target`; count bytes both ways."""

    def __init__(self, name, listen, target):
        self.name, self.listen, self.target = name, listen, target
        self.up = self.down = self.conns = 0       # up = client->server
        self.lock = threading.Lock()
        self.srv = mk_listen(listen)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                s = mk_connect(self.target)
            except OSError as e:
                say("proxy %s: connect %s failed: %s" % (self.name, self.target, e))
                c.close()
                continue
            with self.lock:
                self.conns += 1
            threading.Thread(target=self._pipe, args=(c, s, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, "down"), daemon=True).start()

    def _pipe(self, a, b, direction):
        try:
            while True:
                d = a.recv(1 << 20)
                if not d:
                    break
                b.sendall(d)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(d))
        except OSError:
            pass
        for s, how in ((b, socket.SHUT_WR), (a, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass

    def close(self):
        self.srv.close()


def mk_listen(addr):
    if addr[0] == "unix":
        if os.path.exists(addr[1]):
            os.unlink(addr[1])
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr[1])
    else:
        s = socket.socket(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr[1], addr[2]))
    s.listen(8)
    return s


def mk_connect(addr):
    if addr[0] == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(addr[1])
    else:
        s = socket.create_connection((addr[1], addr[2]))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def show(addr):
    return addr[1] if addr[0] == "unix" else "%s:%d" % addr[1:]


def uri(addr):             # migration URI
    return "unix:%s" % addr[1] if addr[0] == "unix" else "tcp:%s:%d" % (addr[1], addr[2])


def sockaddr(addr):        # QAPI SocketAddress
    if addr[0] == "unix":
        return {"type": "unix", "path": addr[1]}
    return {"type": "inet", "host": addr[1], "port": str(addr[2])}


# ---------------------------------------------------------------- helpers
def guest_env(guest_dir):
    cmd = [os.path.join(HERE, "guest.sh")] + ([guest_dir] if guest_dir else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("guest.sh failed (%d):\n%s%s" % (out.returncode, out.stdout, out.stderr))
    envf = re.search(r"^env file:\s+(\S+)", out.stdout, re.M).group(1)
    env = {}
    for line in open(envf):
        k, _, v = line.rstrip("\n").partition("=")
        env[k] = v.strip('"')
    return env


def counters(path):
    try:
        txt = open(path, "rb").read().decode("ascii", "replace")
    except FileNotFoundError:
        return "", []
    return txt, [int(x) for x in re.findall(r"^counter (\d+)\r?$", txt, re.M)]


def wait_serial(path, pattern, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        txt, _ = counters(path)
        if re.search(pattern, txt, re.M):
            return True
        time.sleep(0.05)
    return False


VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "%(name)s"
guestOS = "debian12-64"
numvcpus = "1"
memsize = "%(mem)d"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "%(disk)s"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "e1000"
ethernet0.networkName = "VM Network"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:12:34:56"
"""


def edge_agent_cmd(a, env, name, disk, qmp, serial, incoming):
    """The command line `edge-agent qemu-command` gives for a .vmx of this guest (the one
    the gateway's live migration expects on the source and builds for its destination);
    the destination gets the same plus -incoming defer [-S]."""
    vmx = os.path.join(os.path.dirname(disk), "%s.vmx" % name)
    with open(vmx, "w") as f:
        f.write(VMX % {"name": a.vm_name, "mem": a.mem, "disk": os.path.basename(disk)})
    append = env["APPEND"] + (" dirty=%d" % a.dirty if a.dirty else "")
    out = subprocess.run([a.edge_agent, "qemu-command", "--vmx", vmx, "--qmp", qmp, "--serial-log", serial,
                          "--kernel", env["KERNEL"], "--initrd", env["INITRD"], "--append", append],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("edge-agent qemu-command failed (%d): %s" % (out.returncode, out.stderr.strip()))
    argv = shlex.split(out.stdout.strip())
    cmd = [a.qemu] + argv[1:]
    if incoming:
        cmd += ["-incoming", "defer"]
        if a.dest_paused:
            cmd += ["-S"]
    return cmd


def qemu_cmd(a, env, name, disk, qmp, serial, incoming):
    prefix = shlex.split(a.dst_prefix if incoming else a.src_prefix)
    if a.edge_agent:
        return prefix + edge_agent_cmd(a, env, name, disk, qmp, serial, incoming)
    return prefix + plain_qemu_cmd(a, env, name, disk, qmp, serial, incoming)


def plain_qemu_cmd(a, env, name, disk, qmp, serial, incoming):
    v = a.dst_variant if incoming else "same"     # experiments: deliberately mismatched destination
    append = env["APPEND"] + (" dirty=%d" % a.dirty if a.dirty else "") + (" x=1" if v == "append" else "")
    boot = ["-kernel", env["KERNEL"], "-initrd", env["INITRD"], "-append", append]
    if v == "no-kernel":
        boot = []
    elif v == "no-initrd":
        boot = ["-kernel", env["KERNEL"], "-append", append]
    cmd = [a.qemu, "-name", name, "-machine", a.machine, "-accel", "tcg", "-cpu", "max",
           "-m", str(a.mem * 2 if v == "mem" else a.mem), "-smp", "1", "-nodefaults", "-display", "none",
           "-no-reboot"] + boot + [
           "-blockdev", "driver=file,filename=%s,node-name=disk0-file,cache.direct=off" % disk,
           "-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0",
           "-device", "virtio-blk-pci,id=%s,drive=disk0%s" % (
               "vblk9" if v == "devid" else "vblk0", ",addr=0x9" if v == "pciaddr" else ""),
           "-serial", "file:%s" % serial,
           "-qmp", "unix:%s,server=on,wait=off" % qmp]
    if incoming:
        cmd += ["-incoming", "defer"]
        if a.dest_paused:
            cmd += ["-S"]
    return cmd


def start(cmd, logpath):
    say("exec: " + " ".join(shlex.quote(c) for c in cmd))
    p = subprocess.Popen(cmd, stdout=open(logpath, "wb"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    PROCS.append(p)
    return p


def kill_all():
    for p in PROCS:
        if p.poll() is None:
            p.kill()
            p.wait()


def dirty_rate(q, calc_time):
    q.cmd("calc-dirty-rate", **{"calc-time": calc_time, "sample-pages": 512})
    end = time.monotonic() + calc_time + 15
    while time.monotonic() < end:
        r = q.cmd("query-dirty-rate", log=False)
        if r.get("status") == "measured":
            QMP_LOG.append((now(), q.side, "cmd", "query-dirty-rate -> " + json.dumps(r, sort_keys=True)))
            return r
        time.sleep(0.2)
    raise QMPError("dirty rate not measured")


def sockaddr_legacy(addr):  # QAPI SocketAddressLegacy (nbd-server-start still takes this)
    a = sockaddr(addr)
    return {"type": a.pop("type"), "data": a}


def node_active(q, node):
    """QEMU 10 reports whether a node is active (not inactivated for migration)."""
    for n in q.cmd("query-named-block-nodes", flat=True):
        if n.get("node-name") == node:
            QMP_LOG.append((now(), q.side, "note", "node %s active=%s" % (node, n.get("active"))))
            return n.get("active")
    return None


PREFILL_OFF = 4 << 20
NODE = "disk0"      # the disk's block node (drive0 with --edge-agent)


def parse_size(sz):
    m = re.fullmatch(r"(\d+)([KMGT]?)", sz.upper().rstrip("B").rstrip("I"))
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def region_hash(image, fmt, mib):
    """sha256 of [PREFILL_OFF, +mib MiB) of an image, read with qemu-img dd."""
    import hashlib
    with tempfile.TemporaryDirectory() as td:
        out = os.path.join(td, "r.raw")
        subprocess.run(["qemu-img", "dd", "-U", "-f", fmt, "-O", "raw", "bs=1M", "skip=%d" % (PREFILL_OFF >> 20),
                        "count=%d" % ((PREFILL_OFF >> 20) + mib),  # qemu-img dd: count includes skip
                        "if=" + image, "of=" + out], check=True, capture_output=True)
        h = hashlib.sha256()
        with open(out, "rb") as f:
            while True:
                d = f.read(1 << 20)
                if not d:
                    break
                h.update(d)
        return h.hexdigest()


def fmt_bytes(n):
    return "%d B (%.2f MiB)" % (n, n / 1048576.0)


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest-dir", help="guest cache dir (guest.sh argument)")
    ap.add_argument("--workdir", help="keep images/logs/sockets here (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temp work dir")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--machine", default="q35")
    ap.add_argument("--mem", type=int, default=256, help="guest MiB")
    ap.add_argument("--disk-size", default="64M")
    ap.add_argument("--prefill", type=int, default=32,
                    help="MiB of random data put on the source disk (at 4 MiB) for the mirror to copy")
    ap.add_argument("--dirty", type=int, default=0, help="guest dirty=MIB (memory rewritten in a loop)")
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    ap.add_argument("--via-proxy", action="store_true", help="put counting proxies on the NBD and migration paths")
    ap.add_argument("--run-before", type=float, default=3.0, help="seconds to let the guest count before migrating")
    ap.add_argument("--run-after", type=float, default=4.0, help="seconds to let the destination run afterwards")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms")
    ap.add_argument("--max-bandwidth", type=int, default=0, help="bytes/s, 0 = leave QEMU's default")
    ap.add_argument("--cap", action="append", default=[],
                    help="extra migration capability to enable on both sides (e.g. auto-converge)")
    ap.add_argument("--copy-mode", choices=["background", "write-blocking"], default="background")
    ap.add_argument("--switchover", choices=["pre-switchover", "after"], default="pre-switchover",
                    help="finalise the mirror at the pre-switchover pause (libvirt) or after migration completed")
    ap.add_argument("--no-dest-paused", dest="dest_paused", action="store_false",
                    help="start the destination without -S (it then runs as soon as RAM arrived)")
    ap.add_argument("--export-order", choices=["before-incoming", "after-incoming"], default="before-incoming")
    ap.add_argument("--allow-inactive", choices=["auto", "yes", "no"], default="auto",
                    help="block-export-add allow-inactive: auto = without (retry with it only if that fails); "
                         "yes makes the NBD export refuse writes, so the mirror fails (EPERM)")
    ap.add_argument("--dst-variant", default="same",
                    choices=["same", "no-kernel", "no-initrd", "append", "mem", "devid", "pciaddr",
                             "small-disk", "big-disk"],
                    help="experiment: start the destination with a deliberately different command line")
    ap.add_argument("--dirty-calc-time", type=int, default=1)
    ap.add_argument("--edge-agent", metavar="BIN",
                    help="run both QEMUs with the command line `BIN qemu-command` prints for a .vmx of this guest "
                         "(1 vCPU, --mem MiB, the disk as scsi0:0, one e1000 NIC): the gateway's own; disk node drive0")
    ap.add_argument("--vm-name", default="live-bench", help="displayName of the .vmx (--edge-agent)")
    ap.add_argument("--src-prefix", default="", help="command prefix for the source QEMU, e.g. 'ip netns exec wan-onprem'")
    ap.add_argument("--dst-prefix", default="", help="command prefix for the destination QEMU")
    ap.add_argument("--listen-host", default="127.0.0.1",
                    help="--transport tcp: the address the destination listens on (NBD and migration)")
    ap.add_argument("--nbd-port", type=int, default=0, help="--transport tcp: destination NBD port (0: any free)")
    ap.add_argument("--mig-port", type=int, default=0, help="--transport tcp: destination migration port (0: any free)")
    ap.add_argument("--src-image", metavar="QCOW2",
                    help="copy this image as the source disk (instead of an empty one with --prefill MiB of random "
                         "data); --prefill then names how many MiB at 4 MiB to check on the destination")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    global NODE
    NODE = "drive0" if a.edge_agent else "disk0"

    if a.workdir:
        wd = os.path.abspath(a.workdir)
        os.makedirs(wd, exist_ok=True)
    else:
        wd = tempfile.mkdtemp(prefix="live-mig-")
    say("work dir %s" % wd)
    env = guest_env(a.guest_dir)
    say("guest: kernel %s initrd %s" % (env["KERNEL"], env["INITRD"]))

    results = {"ok": False}
    P = lambda n: os.path.join(wd, n)
    for f in ("src.qcow2", "dst.qcow2", "src-serial.log", "dst-serial.log"):
        if os.path.exists(P(f)):
            os.unlink(P(f))
    for d in ("src.qcow2", "dst.qcow2"):
        size = a.disk_size
        if d == "dst.qcow2" and a.dst_variant in ("small-disk", "big-disk"):
            size = str(parse_size(a.disk_size) // 2 if a.dst_variant == "small-disk" else parse_size(a.disk_size) * 2)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", P(d), size], check=True)
    if a.src_image:
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", a.src_image, P("src.qcow2")], check=True)
        size = subprocess.run(["qemu-img", "info", "--output=json", a.src_image], check=True,
                              capture_output=True, text=True)
        size = json.loads(size.stdout)["virtual-size"]
        if size != parse_size(a.disk_size):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", P("dst.qcow2"), str(size)], check=True)
        if a.prefill:
            results["prefill_sha256"] = region_hash(a.src_image, "qcow2", a.prefill)
    elif a.prefill:
        # random data at [PREFILL_OFF, +prefill MiB) of the source disk, so the mirror has work;
        # the guest only writes the first ~2 MiB
        raw = P("prefill.raw")
        with open(raw, "wb") as f:
            f.truncate(parse_size(a.disk_size))
            f.seek(PREFILL_OFF)
            for _ in range(a.prefill):
                f.write(os.urandom(1 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, P("src.qcow2")], check=True)
        results["prefill_sha256"] = region_hash(raw, "raw", a.prefill)
        os.unlink(raw)

    # --- addresses: real endpoints on the destination, and what the source connects to
    if a.transport == "unix":
        nbd_real, mig_real = ("unix", P("dst-nbd.sock")), ("unix", P("dst-mig.sock"))
        nbd_via, mig_via = ("unix", P("proxy-nbd.sock")), ("unix", P("proxy-mig.sock"))
    else:
        nbd_real = ("tcp", a.listen_host, a.nbd_port or free_port())
        mig_real = ("tcp", a.listen_host, a.mig_port or free_port())
        nbd_via, mig_via = ("tcp", "127.0.0.1", free_port()), ("tcp", "127.0.0.1", free_port())
    proxies = []
    if a.via_proxy:
        proxies = [Proxy("nbd", nbd_via, nbd_real), Proxy("migration", mig_via, mig_real)]
        nbd_src, mig_src = nbd_via, mig_via
    else:
        nbd_src, mig_src = nbd_real, mig_real
    say("NBD: destination listens on %s, source connects to %s" % (show(nbd_real), show(nbd_src)))
    say("migration: destination listens on %s, source connects to %s" % (show(mig_real), show(mig_src)))

    try:
        # --- source
        t_boot = now()
        src_p = start(qemu_cmd(a, env, "src", P("src.qcow2"), P("src.qmp"), P("src-serial.log"), False),
                      P("src-qemu.log"))
        src = QMP("src", P("src.qmp"))
        if not wait_serial(P("src-serial.log"), r"^counter 1\r?$", 90):
            raise RuntimeError("source guest did not start counting; see %s" % P("src-serial.log"))
        results["boot_s"] = now() - t_boot
        say("source guest counting %.2f s after QEMU start" % results["boot_s"])

        # --- destination (same command line + -incoming defer [+ -S])
        dst_p = start(qemu_cmd(a, env, "dst", P("dst.qcow2"), P("dst.qmp"), P("dst-serial.log"), True),
                      P("dst-qemu.log"))
        dst = QMP("dst", P("dst.qmp"))
        say("destination status: %s" % dst.cmd("query-status")["status"])

        # --- dirty rate on the source (page sampling works with TCG)
        time.sleep(max(0.0, a.run_before - 1))
        dr = dirty_rate(src, a.dirty_calc_time)
        results["dirty_rate_mib_s"] = dr.get("dirty-rate")
        say("source dirty rate: %s MiB/s (guest dirty=%d MiB, calc-time %d s, mode %s)" % (
            dr.get("dirty-rate"), a.dirty, a.dirty_calc_time, dr.get("mode")))

        for q in (src, dst):
            q.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        if a.switchover == "pre-switchover":
            src.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "pause-before-switchover", "state": True}])
        params = {"downtime-limit": a.downtime_limit}
        if a.max_bandwidth:
            params["max-bandwidth"] = a.max_bandwidth
        src.cmd("migrate-set-parameters", **params)
        for c in a.cap:
            for q in (src, dst):
                q.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}])
        mp = src.cmd("query-migrate-parameters")
        results["max_bandwidth"] = mp.get("max-bandwidth")
        results["downtime_limit"] = mp.get("downtime-limit")

        def export():
            nbd_args = {"type": "nbd", "id": "exp0", "node-name": NODE, "name": "disk0", "writable": True}
            if a.allow_inactive == "yes":
                nbd_args["allow-inactive"] = True
            r = dst.cmd("block-export-add", check=(a.allow_inactive != "auto"), **nbd_args)
            if isinstance(r, dict) and "error" in r:
                say("block-export-add without allow-inactive failed: %s; retrying with allow-inactive"
                    % r["error"]["desc"])
                results["needed_allow_inactive"] = True
                nbd_args["allow-inactive"] = True
                dst.cmd("block-export-add", **nbd_args)
            else:
                results.setdefault("needed_allow_inactive", a.allow_inactive == "yes")

        # --- destination: NBD server + writable export of its disk node
        results["dst_node_active_before_export"] = node_active(dst, NODE)
        dst.cmd("nbd-server-start", addr=sockaddr_legacy(nbd_real))
        if a.export_order == "before-incoming":
            export()
        dst.cmd("migrate-incoming", uri=uri(mig_real))
        if a.export_order == "after-incoming":
            export()
        say("destination status: %s" % dst.cmd("query-status")["status"])
        results["dst_node_active_during_incoming"] = node_active(dst, NODE)

        # --- source: NBD client node + mirror
        t_mirror = now()
        src.cmd("blockdev-add", **{"driver": "nbd", "node-name": "mirror-target",
                                   "server": sockaddr(nbd_src), "export": "disk0"})
        ev0 = len(src.events)
        src.cmd("blockdev-mirror", **{"job-id": "mirror0", "device": NODE, "target": "mirror-target",
                                      "sync": "full", "copy-mode": a.copy_mode})
        ready = src.wait_event("*", timeout=a.timeout, since=ev0, pred=lambda e: e["event"] in (
            "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") and e["data"]["device"] == "mirror0")
        if ready["event"] != "BLOCK_JOB_READY":
            raise RuntimeError("mirror ended before READY: %s %s" % (ready["event"], ready["data"]))
        results["mirror_ready_s"] = now() - t_mirror
        results["mirror_bytes_at_ready"] = ready["data"].get("offset")
        say("mirror READY after %.2f s: %s" % (results["mirror_ready_s"], ready["data"]))

        # --- migrate
        _, c = counters(P("src-serial.log"))
        say("source counter before migrate: %s" % (c[-1] if c else None))
        t_mig = now()
        src.cmd("migrate", uri=uri(mig_src))
        end = time.monotonic() + a.timeout
        mirror_done = None
        while True:
            src.pump(0.05)
            info = src.cmd("query-migrate", log=False)
            st = info.get("status")
            if st == "pre-switchover" and a.switchover == "pre-switchover" and mirror_done is None:
                # source vCPUs are stopped: no more guest writes; finalise the mirror now
                QMP_LOG.append((now(), "src", "note", "query-migrate status pre-switchover"))
                ev1 = len(src.events)
                src.cmd("block-job-cancel", device="mirror0")
                mirror_done = src.wait_event("BLOCK_JOB_COMPLETED", timeout=a.timeout,
                                             pred=lambda e: e["data"]["device"] == "mirror0", since=ev1)
                src.cmd("migrate-continue", state="pre-switchover")
            if st in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > end:
                QMP_LOG.append((now(), "src", "cmd", "query-migrate -> " + json.dumps(info, sort_keys=True)))
                src.cmd("migrate_cancel")
                raise RuntimeError("migration did not converge in %.0f s (cancelled): remaining %s bytes, "
                                   "dirty-pages-rate %s pages/s, %s dirty syncs" % (
                                       a.timeout, info["ram"].get("remaining"), info["ram"].get("dirty-pages-rate"),
                                       info["ram"].get("dirty-sync-count")))
        QMP_LOG.append((now(), "src", "cmd", "query-migrate -> " + json.dumps(info, sort_keys=True)))
        results["migrate_wall_s"] = now() - t_mig
        if st != "completed":
            raise RuntimeError("migration %s: %s" % (st, info.get("error-desc")))
        say("migration completed: %s" % json.dumps(info, sort_keys=True))
        results.update({"total_time_ms": info.get("total-time"), "downtime_ms": info.get("downtime"),
                        "setup_time_ms": info.get("setup-time"),
                        "ram_transferred": info["ram"]["transferred"], "ram_total": info["ram"]["total"],
                        "ram_dirty_sync_count": info["ram"].get("dirty-sync-count"),
                        "ram_mbps": info["ram"].get("mbps")})

        if mirror_done is None:
            # switchover=after: source paused (postmigrate), its images inactivated
            st_src = src.cmd("query-status")["status"]
            ev1 = len(src.events)
            r = src.cmd("block-job-cancel", device="mirror0", check=False)
            if isinstance(r, dict) and "error" in r:
                raise RuntimeError("block-job-cancel after migration failed: %s" % r["error"])
            mirror_done = src.wait_event("BLOCK_JOB_COMPLETED", timeout=a.timeout,
                                         pred=lambda e: e["data"]["device"] == "mirror0", since=ev1)
            say("source status was %s when the mirror was cancelled" % st_src)
        if mirror_done["data"].get("error"):
            raise RuntimeError("mirror finished with error: %s" % mirror_done["data"])
        results["mirror_bytes"] = mirror_done["data"].get("offset")
        results["mirror_len"] = mirror_done["data"].get("len")
        say("mirror finished: %s" % mirror_done["data"])

        # --- drop the NBD client on the source (else the export stays "in use"), stop NBD
        src.cmd("blockdev-del", **{"node-name": "mirror-target"})
        dst.cmd("nbd-server-stop")          # also removes the export exp0
        # the destination must have loaded the whole stream before it may run
        dst.wait_event("MIGRATION", timeout=a.timeout, pred=lambda e: e["data"]["status"] in (
            "completed", "failed"))
        ds = dst.cmd("query-status")["status"]
        if ds != "running":
            dst.cmd("cont")
        t_cont = now()
        stop = [e["_t"] for e in src.events if e["event"] == "STOP"]
        resume = [e["_t"] for e in dst.events if e["event"] == "RESUME"]
        if stop and resume:
            results["guest_pause_ms"] = (resume[-1] - stop[-1]) * 1000
        results["switch_wall_s"] = t_cont - t_mig
        results["total_wall_s"] = t_cont - t_mirror
        say("destination status %s -> %s" % (ds, dst.cmd("query-status")["status"]))
        src.cmd("quit")
        src_p.wait(10)

        # --- let the destination run, then check
        time.sleep(a.run_after)
        srctxt, sc = counters(P("src-serial.log"))
        dsttxt, dc = counters(P("dst-serial.log"))
        dst.cmd("quit")
        dst_p.wait(10)
        results["src_last_counter"] = sc[-1] if sc else None
        results["dst_first_counter"] = dc[0] if dc else None
        results["dst_last_counter"] = dc[-1] if dc else None
        allc = [int(x) for x in re.findall(r"counter (\d+)", srctxt + dsttxt)]
        problems = []
        if not sc or not dc:
            problems.append("no counters on %s" % ("source" if not sc else "destination"))
        else:
            if "guest up" in dsttxt:
                problems.append("destination guest booted instead of resuming")
            if dc[0] not in (sc[-1] + 1, sc[-1] + 2):     # +2: a line split across the switch
                problems.append("destination starts at %d, source ended at %d" % (dc[0], sc[-1]))
            if any(b != x + 1 for x, b in zip(allc, allc[1:])):
                problems.append("counter not consecutive across the switch")
            if dc[-1] <= sc[-1] + 1:
                problems.append("destination did not keep counting")
        ck = subprocess.run([sys.executable, os.path.join(HERE, "check-disk.py"), "--json",
                             "--min-counter", str((sc[-1] + 1) if sc else 1), P("dst.qcow2")],
                            capture_output=True, text=True)
        results["check_disk"] = json.loads(ck.stdout) if ck.stdout.strip() else ck.stderr
        if ck.returncode != 0:
            problems.append("check-disk failed: %s" % ck.stdout.strip())
        if a.prefill:
            hd = region_hash(P("dst.qcow2"), "qcow2", a.prefill)
            results["prefill_copied_ok"] = hd == results["prefill_sha256"]
            if hd != results["prefill_sha256"]:
                problems.append("prefilled region differs on the destination disk")
        results["problems"] = problems
        results["ok"] = not problems
    except Exception as e:
        results["problems"] = ["%s: %s" % (type(e).__name__, e)]
        say("FAILED: %s" % e)
        for f in ("src-qemu.log", "dst-qemu.log"):
            try:
                t = open(P(f)).read().strip()
                if t:
                    say("%s:\n%s" % (f, t))
            except OSError:
                pass
    finally:
        kill_all()
        for p in proxies:
            p.close()

    # --- report
    print("\n=== QMP sequence (t = seconds since script start) ===")
    for t, side, kind, text in sorted(QMP_LOG, key=lambda x: x[0]):
        print("%8.3f %-3s %-5s %s" % (t, side, kind, text))
    print("\n=== results ===")
    r = results
    def g(k, f="%s"):
        return (f % r[k]) if r.get(k) is not None else "-"
    print("guest boot to first counter (TCG): %s s" % g("boot_s", "%.2f"))
    print("dirty rate (calc-dirty-rate %d s, guest dirty=%d MiB): %s MiB/s" % (
        a.dirty_calc_time, a.dirty, g("dirty_rate_mib_s")))
    print("mirror: READY after %s s, %s bytes copied at READY, %s bytes total (len %s)" % (
        g("mirror_ready_s", "%.2f"), g("mirror_bytes_at_ready"), g("mirror_bytes"), g("mirror_len")))
    print("migration parameters: max-bandwidth %s B/s, downtime-limit %s ms, extra capabilities %s" % (
        g("max_bandwidth"), g("downtime_limit"), a.cap or "-"))
    print("migration: total-time %s ms, downtime %s ms, setup %s ms, wall %s s, ram transferred %s of %s, "
          "%s dirty syncs, %s Mbit/s" % (g("total_time_ms"), g("downtime_ms"), g("setup_time_ms"),
                                          g("migrate_wall_s", "%.2f"), g("ram_transferred"), g("ram_total"),
                                          g("ram_dirty_sync_count"), g("ram_mbps", "%.0f")))
    print("guest pause seen by this script (source STOP event -> destination RESUME event): %s ms" % g(
        "guest_pause_ms", "%.0f"))
    print("total (blockdev-add NBD -> destination running): %s s; migrate -> destination running: %s s" % (
        g("total_wall_s", "%.2f"), g("switch_wall_s", "%.2f")))
    print("block-export-add needed allow-inactive: %s (export order %s); destination disk0 active: "
          "before export %s, after export+migrate-incoming %s" % (
              g("needed_allow_inactive"), a.export_order, g("dst_node_active_before_export"),
              g("dst_node_active_during_incoming")))
    for p in proxies:
        print("proxy %-9s %s -> %s: %d conn, client->server %s, server->client %s" % (
            p.name, show(p.listen), show(p.target), p.conns, fmt_bytes(p.up), fmt_bytes(p.down)))
        r["proxy_" + p.name] = {"up": p.up, "down": p.down, "conns": p.conns}
    if a.prefill:
        print("prefilled %d MiB on the source disk copied intact to the destination: %s" % (
            a.prefill, g("prefill_copied_ok")))
    print("counter: source last %s, destination first %s, destination last %s" % (
        g("src_last_counter"), g("dst_first_counter"), g("dst_last_counter")))
    print("check-disk (destination): %s" % json.dumps(r.get("check_disk")))
    for pr in r.get("problems", []):
        print("PROBLEM:", pr)
    print("RESULT: %s" % ("PASS" if r["ok"] else "FAIL"))
    print("RESULT-JSON: " + json.dumps(r, sort_keys=True, default=str))
    if not a.workdir and not a.keep and r["ok"]:
        shutil.rmtree(wd, ignore_errors=True)
        print("files: %s (removed; use --keep or --workdir to keep)" % wd)
    else:
        print("files: %s" % wd)
    sys.exit(0 if r["ok"] else 1)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (kill_all(), sys.exit(143)))
    main()
