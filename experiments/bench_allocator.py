"""What the host allocator changes in a training step: step time, page faults per step and
peak resident memory under glibc's default and other settings, in fresh processes.

    python -m experiments.bench_allocator                      # Lite0 and ResNet-18, 112 px
    python -m experiments.bench_allocator --models=efficientnet_lite0 --sizes=112,227 \
        --settings=default,huge_pages,one_heap

Settings (each holds for a whole process and must be made before JAX starts its threads):
- default: glibc's malloc as it comes (``glibc.malloc.hugetlb=0``);
- huge_pages: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, what `gl_jax.host_memory` gives
  the command lines by default: transparent huge pages for large blocks;
- reuse: what they get with ``GL_JAX_HOST_MALLOC=reuse``: huge pages, large blocks from
  the heap and never trimmed (``host_memory.REUSE_TUNABLES``), and JAX's CPU computations
  on the calling thread (``host_memory.configure_jax``);
- one_heap: freed memory kept in one heap (GLIBC_TUNABLES ONE_HEAP_TUNABLES: one arena
  for every thread, no mmap, no trimming), the alternative that was not kept: pages are
  reused, but the heap keeps all it ever held and fragments, and peak memory grows;
- tcmalloc: gperftools' tcmalloc (``LD_PRELOAD``, the library from --tcmalloc or the
  system's ``libtcmalloc_minimal``, e.g. Debian's libtcmalloc-minimal4): keeps freed spans
  for reuse without the per-thread arenas that make one_heap grow.

Every (backbone, size, setting) runs in its own child process, the settings of one backbone
and size one after the other. The child times bench_models' training step (random
parameters, batch --batch, train mode, SGD) for --steps steps after two warm-up steps and
counts the minor page faults of each (getrusage). Prints one table: per setting the fastest
and the median step, the median faults per step, the peak resident memory, and each
setting's speed-up over the first one (fastest steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from gl_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ("default", "huge_pages", "reuse", "one_heap", "tcmalloc")
# Set when the process starts (mallopt from Python came after the first threads had
# their own arenas).
ONE_HEAP_TUNABLES = {"glibc.malloc.arena_max": "1", "glibc.malloc.mmap_max": "0",
                     "glibc.malloc.trim_threshold": str(2 ** 64 - 1)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18",
                        help="comma-separated registry names")
    parser.add_argument("--sizes", default="112", help="comma-separated image sizes (px)")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    parser.add_argument("--settings", default="default,huge_pages",
                        help="comma-separated, from " + ",".join(SETTINGS) + "; the first is "
                             "the baseline of the speed-ups")
    parser.add_argument("--tcmalloc", default=None,
                        help="path of libtcmalloc for the tcmalloc setting (default: the "
                             "system's libtcmalloc_minimal)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)   # "model,size"
    return parser.parse_args(argv)


def child(args) -> dict:
    """One backbone and size in this process: times and faults of its training step."""
    setting = os.environ["BENCH_ALLOCATOR_SETTING"]
    on_calling_thread = host_memory.configure_jax()     # reuse only, as the trainer does
    import jax
    import jax.numpy as jnp
    from experiments import bench_models

    name, size = args.child.split(",")
    size = bench_models.supported_size(name, int(size))
    model = bench_models.random_model(name, 100, jnp.float32)
    step, params, stats = bench_models.make_train_step(model)
    images = jax.random.normal(jax.random.key(0), (args.batch, size, size, 3), jnp.float32)
    for _ in range(2):
        jax.block_until_ready(step(params, stats, images))
    seconds, faults = [], []
    for _ in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        jax.block_until_ready(step(params, stats, images))
        seconds.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"setting": setting, "tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "on_calling_thread": on_calling_thread,
            "preloaded": _mapped(os.environ.get("LD_PRELOAD")),
            "size": size, "fastest": min(seconds),
            "median": statistics.median(seconds), "faults": statistics.median(faults),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _mapped(library: str | None) -> bool:
    """Whether ``library`` (a path or a soname such as libtcmalloc_minimal.so.4) is mapped
    into this process; the mapped file may be the versioned file a soname links to."""
    if not library:
        return False
    with open("/proc/self/maps") as maps:
        return any(os.path.basename(library) in line for line in maps)


def find_tcmalloc(path: str | None) -> str:
    """The tcmalloc library to preload: ``path``, or the soname of the system's
    libtcmalloc_minimal (ld.so finds it)."""
    import ctypes.util
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"--tcmalloc: {path} is not a file")
        return path
    found = ctypes.util.find_library("tcmalloc_minimal")
    if not found:
        raise ValueError("tcmalloc: no libtcmalloc_minimal on this system (Debian/Ubuntu: "
                         "libtcmalloc-minimal4); give its path with --tcmalloc=PATH")
    return found


def child_environment(setting: str, tcmalloc: str | None = None) -> dict:
    """This process's environment for ``setting``: GLIBC_TUNABLES asking for huge pages or
    not, and for tcmalloc the library ``tcmalloc`` (from find_tcmalloc; looked up when
    None) in LD_PRELOAD."""
    if setting not in SETTINGS:
        raise ValueError(f"--settings: unknown setting {setting!r} (known: {', '.join(SETTINGS)})")
    if setting in ("huge_pages", "reuse") and not host_memory.kernel_offers_huge_pages():
        raise ValueError(f"{setting}: this kernel offers no transparent huge pages "
                         f"({host_memory.THP_ENABLED})")
    # An inherited reuse setting (from a restarted gl_jax process) would leak into others.
    inherited = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                 if t.split("=", 1)[0] not in host_memory.REUSE_TUNABLES]
    tunables = host_memory.with_hugetlb(":".join(inherited),
                                        int(setting in ("huge_pages", "reuse")))
    if setting == "reuse":
        tunables = host_memory.with_tunables(tunables, host_memory.REUSE_TUNABLES)
    if setting == "one_heap":
        tunables = host_memory.with_tunables(tunables, ONE_HEAP_TUNABLES)
    env = dict(os.environ, BENCH_ALLOCATOR_SETTING=setting, GLIBC_TUNABLES=tunables)
    env.pop("LD_PRELOAD", None)
    env.pop(host_memory.ENV, None)
    if setting == "reuse":
        env[host_memory.ENV] = "reuse"
    if setting == "tcmalloc":
        # Its report of every allocation over 1 GB would flood stderr.
        env.update(LD_PRELOAD=tcmalloc or find_tcmalloc(None),
                   TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(2 ** 62))
    return env


def run_child(args, name: str, size: int, setting: str) -> dict:
    env = child_environment(setting, args.tcmalloc)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "experiments.bench_allocator", f"--child={name},{size}",
               f"--batch={args.batch}", f"--steps={args.steps}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["tunables"] != env["GLIBC_TUNABLES"]:
        raise RuntimeError(f"the child ran with GLIBC_TUNABLES={result['tunables']!r}, "
                           f"not {env['GLIBC_TUNABLES']!r}")
    if result["on_calling_thread"] != (setting == "reuse"):
        raise RuntimeError(f"the child ran JAX's CPU computations "
                           f"{'on' if result['on_calling_thread'] else 'off'} the calling thread "
                           f"under {setting}")
    if result["preloaded"] != (setting == "tcmalloc"):
        raise RuntimeError(f"the child ran with LD_PRELOAD={env.get('LD_PRELOAD')!r} but the "
                           f"library was {'' if result['preloaded'] else 'not '}mapped")
    return result


def table(settings, rows) -> str:
    head = ["backbone", "px"]
    for setting in settings:
        head += [f"{setting}: fastest / median ms", "faults/step", "peak MB"]
    head += [f"{setting} speed-up" for setting in settings[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in rows:
        cells = [name, str(results[0]["size"])]
        for r in results:
            cells += [f"{r['fastest'] * 1e3:.0f} / {r['median'] * 1e3:.0f}", f"{r['faults']:.0f}",
                      f"{r['peak_mb']:.0f}"]
        cells += [f"{results[0]['fastest'] / r['fastest']:.2f}x" for r in results[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    settings = args.settings.split(",")
    if "tcmalloc" in settings:                  # looked up once, not per child
        args.tcmalloc = find_tcmalloc(args.tcmalloc)
    for setting in settings:
        child_environment(setting, args.tcmalloc)   # an unknown or unavailable one fails now
    rows = []
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            results = [run_child(args, name, int(size), setting) for setting in settings]
            print(f"  {name} {size}px: " + ", ".join(
                f"{s} {r['fastest'] * 1e3:.0f} ms" for s, r in zip(settings, results)),
                flush=True)
            rows.append((name, results))
    print(f"batch {args.batch}, {args.steps} timed steps, one fresh process per setting")
    print(table(settings, rows))


if __name__ == "__main__":
    main()
