"""What touching freed memory again costs after an idle gap: free page reporting on a VM.

    python -m experiments.page_reporting                    # 2 GiB, gaps 0, 0.5 and 3 s
    python -m experiments.page_reporting --size_mb=512 --gaps=0,3 --rounds=3

A virtio balloon with free page reporting (Linux `page_reporting`, Firecracker's balloon)
tells the host about guest memory that has stayed free for about 2 s; the host discards
it, and the next touch of that memory faults on the host as well as in the guest. Each
round maps `--size_mb` of anonymous memory (with `MADV_HUGEPAGE`, as glibc's huge-page
tunable asks, or without), touches one byte per 4 KiB page, unmaps it and sleeps for the
gap. Prints the median seconds per GiB of the touch per page kind and gap, beside the
no-gap time, and whether this machine's balloon offers free page reporting.

Why it matters here: gl_jax's training step under the default `huge_pages` maps its
buffer afresh each step (gl_jax.host_memory). Back to back, the buffer finds memory freed
milliseconds before; a step that waits longer than the reporting delay (PyTorch's turn
in `experiments/bench_models.py`, an evaluation) pays the host's faults too.
"""
from __future__ import annotations

import argparse
import glob
import mmap
import os
import statistics
import time

import numpy as np

BALLOON_DEVICE_ID = 0x0005       # virtio device id of the memory balloon
REPORTING_FEATURE_BIT = 5        # VIRTIO_BALLOON_F_REPORTING


def balloon_reporting(root: str = "/sys/bus/virtio/devices") -> bool | None:
    """True when a virtio balloon offers free page reporting, False when a balloon does
    not, None when there is no balloon (bare metal, or another hypervisor's device)."""
    found = None
    for device in sorted(glob.glob(os.path.join(root, "*"))):
        try:
            with open(os.path.join(device, "device")) as f:
                if int(f.read().strip(), 16) != BALLOON_DEVICE_ID:
                    continue
            with open(os.path.join(device, "features")) as f:
                bits = f.read().strip()   # one character per feature bit, bit 0 first
        except (OSError, ValueError):
            continue
        found = bool(found) or (len(bits) > REPORTING_FEATURE_BIT
                                and bits[REPORTING_FEATURE_BIT] == "1")
    return found


def touch_seconds(size: int, huge: bool) -> float:
    """Maps `size` bytes, touches every 4 KiB page once, unmaps; the touch's seconds."""
    block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge:
            block.madvise(mmap.MADV_HUGEPAGE)
        pages = np.frombuffer(block, np.uint8)
        start = time.perf_counter()
        pages[::4096] = 1
        seconds = time.perf_counter() - start
        del pages
    finally:
        block.close()
    return seconds


def measure(size: int, gaps, rounds: int, kinds=("huge", "small")) -> dict:
    """{(kind, gap): [seconds per GiB of each round]}. Every gap's rounds follow one
    untimed touch, so that the first timed one meets memory freed `gap` seconds before."""
    out = {}
    gib = size / 2 ** 30
    for kind in kinds:
        for gap in gaps:
            touch_seconds(size, kind == "huge")
            times = []
            for _ in range(rounds):
                time.sleep(gap)
                times.append(touch_seconds(size, kind == "huge") / gib)
            out[(kind, gap)] = times
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size_mb", type=int, default=2048, help="memory mapped per touch")
    p.add_argument("--gaps", default="0,0.5,3", help="comma-separated idle seconds")
    p.add_argument("--rounds", type=int, default=4, help="timed touches per gap")
    args = p.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    if args.size_mb <= 0 or args.rounds <= 0 or any(g < 0 for g in gaps):
        p.error("--size_mb and --rounds must be > 0 and every gap >= 0")
    reporting = balloon_reporting()
    print(f"{args.size_mb} MB per touch, {args.rounds} rounds; virtio balloon free page "
          f"reporting: {'none' if reporting is None else ('on' if reporting else 'off')}",
          flush=True)
    print("| pages | gap s | median s per GiB | / first gap's |\n|---|---|---|---|")
    results = measure(args.size_mb << 20, gaps, args.rounds)
    for kind in ("huge", "small"):
        base = statistics.median(results[(kind, gaps[0])])
        for gap in gaps:
            median = statistics.median(results[(kind, gap)])
            print(f"| {kind} | {gap:g} | {median:.3f} | {median / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
