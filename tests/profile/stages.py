#!/usr/bin/env python3
"""Splits a `perf script` dump (samples with DWARF call stacks) into the lift's stages.

Usage: stages.py SIDE PERF_SCRIPT_TXT CPU_SECONDS LOGICAL_BYTES
  SIDE          edge or endpoint (names the stages: compress vs decompress, send vs receive)
  CPU_SECONDS   the process's whole CPU time over the lift (user + system), measured
                outside perf; each stage gets its share of the samples of it
Prints one JSON object: {side, samples, cpu_s, logical_gib, stages: [{stage, share, cpu_s_per_gib}]}

A sample goes to the first stage that its stack names, searched from the leaf:
the kernel's system call (read, pwrite, sendmsg, fsync, ...) for a sample in the kernel,
else the work the user-space frames do (hash, zstd, AEAD, zero test, memcpy). What names
no stage is the protocol, QUIC and the runtime (framing, ACKs, timers, task switches).
A sample under the endpoint's read-back (`datastore::readback`) is billed to "read-back".
"""

import json
import re
import sys

# User-space work, by symbol, tried on each frame from the leaf up.
USER_RULES = [
    ("hash (SHA-256)", re.compile(r"sha2::|sha256|Sha256|compress256")),
    ("hash (BLAKE3)", re.compile(r"blake3")),
    ("zero test", re.compile(r"gateway::chunk::is_zero")),
    # zstd's decoder names its functions decompress/decode; everything else of zstd encodes.
    ("decompress (zstd)", re.compile(r"ZSTD_decompress|ZSTD_decode|HUF_decompress|HUF_decode|"
                                     r"FSE_decode|ZSTD_execSequence|ZSTD_DCtx|ZSTD_buildFSETable")),
    ("compress (zstd)", re.compile(r"ZSTD_|HUF_|FSE_|HIST_|zstd_safe|zstd::stream")),
    ("inflate (streamOptimized/qcow2 source)", re.compile(r"inflate|miniz_oxide|zlib_rs|libz")),
    ("AEAD seal/open (QUIC packets)", re.compile(r"aes|gcm|ghash|chacha|poly1305|ring_core|ring::aead|gfmul")),
    ("copies (memcpy/memmove)", re.compile(r"__memmove|__memcpy|memcpy")),
    ("allocator", re.compile(r"\bmalloc\b|\bfree\b|_int_malloc|_int_free|realloc|cfree|__libc_calloc")),
    ("SQLite (inventory, journal)", re.compile(r"sqlite3")),
]

# System calls, by the kernel entry point's name.
SYSCALLS = [
    ("read the source (kernel)", re.compile(r"^(read|pread64|readv|preadv2?)$")),
    ("write the staged disk (kernel)", re.compile(r"^(write|pwrite64|writev|pwritev2?|fallocate|copy_file_range)$")),
    ("UDP send (kernel)", re.compile(r"^(sendmsg|sendmmsg|sendto)$")),
    ("UDP receive (kernel)", re.compile(r"^(recvmsg|recvmmsg|recvfrom)$")),
    ("sync to disk (kernel)", re.compile(r"^(fsync|fdatasync|sync_file_range|syncfs)$")),
    ("wake-ups and waits (kernel)", re.compile(r"^(futex|epoll_wait|epoll_pwait2?|sched_yield|nanosleep|clock_nanosleep|poll|ppoll)$")),
    ("memory maps (kernel)", re.compile(r"^(mmap|munmap|brk|madvise|mprotect|mremap)$")),
]
# `__x64_sys_pwrite64`, `__sys_sendmsg`, `ksys_read`: the call's name follows "sys_".
SYSCALL_ENTRY = re.compile(r"(?:^|_)sys_(\w+?)(?:\+|$)")
NETWORK = re.compile(r"net_rx_action|udp|__dev_queue_xmit|ip_rcv|ip_output")
PAGE_FAULT = re.compile(r"exc_page_fault|do_user_addr_fault|handle_mm_fault")
FRAME = re.compile(r"^\s*[0-9a-f]+ (.*) \((.*)\)\s*$")


def samples(path):
    """Yields each sample's frames, leaf first, as (symbol, dso)."""
    frames = None
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                if frames:
                    yield frames
                frames = None
            elif not line.startswith(("\t", " ")):
                frames = []
            elif frames is not None:
                m = FRAME.match(line)
                if m:
                    frames.append((m.group(1), m.group(2)))
    if frames:
        yield frames


def stage_of(side, frames):
    kernel = frames and "kernel" in frames[0][1]
    read_back = any("readback" in sym for sym, _ in frames)
    stage = None
    if kernel:
        for sym, _ in frames:
            m = SYSCALL_ENTRY.search(sym)
            if m:
                call = m.group(1)
                stage = next((name for name, rx in SYSCALLS if rx.match(call)), f"other system calls (kernel: {call})")
                break
        else:
            if any(PAGE_FAULT.search(sym) for sym, _ in frames):
                stage = "page faults (kernel)"
            elif any(NETWORK.search(sym) for sym, _ in frames):
                # Loopback delivers a packet in the sender's soft interrupt.
                stage = "UDP packets in soft interrupts (kernel)"
            else:
                stage = "interrupts and scheduling (kernel)"
        if stage == "read the source (kernel)" and side == "endpoint":
            stage = "read (kernel)"
    else:
        for sym, _ in frames:
            stage = next((name for name, rx in USER_RULES if rx.search(sym)), None)
            if stage:
                break
        if stage is None:
            stage = "protocol, QUIC and runtime"
        if side == "endpoint" and stage == "compress (zstd)":
            stage = "decompress (zstd)"
    if read_back:
        stage = "read-back: " + stage
    return stage


def main():
    side, path, cpu_s, logical = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    counts = {}
    total = 0
    for frames in samples(path):
        if not frames:
            continue
        s = stage_of(side, frames)
        counts[s] = counts.get(s, 0) + 1
        total += 1
    if total == 0:
        sys.exit(f"stages.py: no samples with stacks in {path}: did perf record run with --call-graph dwarf?")
    gib = logical / (1 << 30)
    stages = [
        {"stage": s, "share": n / total, "cpu_s_per_gib": cpu_s * n / total / gib}
        for s, n in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    print(json.dumps({"side": side, "samples": total, "cpu_s": cpu_s, "logical_gib": gib, "stages": stages}))


if __name__ == "__main__":
    main()
