"""Where glibc puts a second thread's large blocks under each GL_JAX_HOST_MALLOC mode.

    python -m experiments.heap_arenas
    python -m experiments.heap_arenas --sizes_mb=20,40,60 --blocks=12 --live=2

Under `reuse` (no fresh mappings: ``glibc.malloc.mmap_max=0``) a thread other than the
main one serves blocks from heaps of its own of at most 64 MiB; when a block does not fit
there, glibc takes it from the main thread's heap instead, where the trainer's step
buffer lives. This is how the trainer's batch thread (gl_jax/feed.py) could take the
start of the hole a step buffer left and send the next buffer elsewhere. For each mode
and block size a fresh process starts a thread that allocates ``--blocks`` blocks,
keeping the last ``--live`` of them, and the script prints how many came from the main
thread's heap (within 1 TiB of a block the main thread allocated).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from gl_jax import host_memory

_CHILD = r"""
import ctypes, sys, threading
size, blocks, live = (int(a) for a in sys.argv[1:4])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
mine = libc.malloc(64)        # a block of the main thread's heap (too small to be mapped)
addresses = []
def worker():
    kept = []
    for _ in range(blocks):
        kept.append(libc.malloc(size))
        addresses.append(kept[-1])
        if len(kept) > live:
            libc.free(kept.pop(0))
    for block in kept:
        libc.free(block)
thread = threading.Thread(target=worker)
thread.start()
thread.join()
# The main heap grows up from the program's data; the other threads' heaps are mappings
# near the top of the address space, tens of TiB away.
print(sum(abs(a - mine) < 1 << 40 for a in addresses))
"""


def tunables(mode: str) -> str:
    env = host_memory.tuned_environment({host_memory.ENV: mode}) or {}
    return env.get("GLIBC_TUNABLES", "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="20,30,40,60", help="block sizes, MB (10^6 bytes)")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--live", type=int, default=2, help="blocks kept at once")
    p.add_argument("--modes", default="huge_pages,reuse")
    args = p.parse_args(argv)
    print(f"| mode | block MB | of {args.blocks} blocks, from the main thread's heap |")
    print("|---|---|---|")
    for mode in args.modes.split(","):
        env = dict(os.environ, GLIBC_TUNABLES=tunables(mode))
        for mb in args.sizes_mb.split(","):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(int(float(mb) * 1e6)),
                                   str(args.blocks), str(args.live)], env=env,
                                  capture_output=True, text=True, check=True)
            print(f"| {mode} | {mb} | {done.stdout.strip()} |")


if __name__ == "__main__":
    main()
