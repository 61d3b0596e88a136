"""Whole `python -m gl_jax.main` runs under each GL_JAX_HOST_MALLOC mode, side by side:
wall time, peak resident memory and the final test recall@1 of each run.

    python -m experiments.bench_host_malloc                         # the embedded default
    python -m experiments.bench_host_malloc --modes=huge_pages,reuse --rounds=2 -- \\
        --config=configs/omniglot.py --config.data.image_size=227 ...

Everything after `--` goes to `python -m gl_jax.main` (default: the embedded Omniglot
config without progress bars); each run gets a fresh temporary workdir. The modes take
turns within a round, so a slow spell of a shared machine falls on all of them. Peak
memory is the trainer process's own (`os.wait4`), start-up, compilation and
evaluations included.
Prints one row per run, then per mode the median wall time and peak, and their ratio to
the first mode.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from gl_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RUN = ["--config=configs/omniglot.py", "--config.logging.progress=False"]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    run = argv[argv.index("--") + 1:] if "--" in argv else list(DEFAULT_RUN)
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="huge_pages,reuse", help="comma-separated "
                   f"GL_JAX_HOST_MALLOC modes ({', '.join(host_memory.MODES)})")
    p.add_argument("--rounds", type=int, default=2, help="runs per mode, taking turns")
    args = p.parse_args(own)
    args.modes = args.modes.split(",")
    for mode in args.modes:
        host_memory.mode({host_memory.ENV: mode})      # a ValueError names a bad one
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds}: at least 1")
    args.run = run
    return args


def measure(command: list[str], env: dict, cwd: str = REPO) -> tuple[float, int, int, str]:
    """(wall seconds, peak resident bytes, exit status, the end of its stderr) of one child
    process; the peak is the child's own (its restart keeps the process id)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                 stderr=errors)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        tail = errors.read()[-3000:].decode(errors="replace")
    return seconds, usage.ru_maxrss * 1024, child.returncode, tail


def one_run(mode: str, run_args: list[str]) -> dict:
    """One trainer run under `mode` in a fresh workdir."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {k: v for k, v in os.environ.items()
               if k not in ("GLIBC_TUNABLES", host_memory.RESTARTED)}
        env[host_memory.ENV] = mode
        command = [sys.executable, "-m", "gl_jax.main", *run_args, f"--workdir={workdir}"]
        seconds, peak, status, tail = measure(command, env)
        if status != 0:
            raise RuntimeError(f"{mode}: {' '.join(command)} exited with {status}:\n{tail}")
        recall = None
        path = os.path.join(workdir, "results.json")
        if os.path.exists(path):
            with open(path) as f:
                test = json.load(f).get("test") or {}
            recall = test.get("recall@1")
    return {"mode": mode, "seconds": seconds, "peak_mb": peak / 2 ** 20, "recall@1": recall}


def summary(rows: list[dict], modes: list[str]) -> str:
    lines = ["| mode | median wall s | median peak MB | wall / first mode's | "
             "peak / first mode's |", "|---|---|---|---|---|"]
    medians = {m: (statistics.median(r["seconds"] for r in rows if r["mode"] == m),
                   statistics.median(r["peak_mb"] for r in rows if r["mode"] == m))
               for m in modes}
    base_s, base_mb = medians[modes[0]]
    for m in modes:
        s, mb = medians[m]
        lines.append(f"| {m} | {s:.1f} | {mb:.0f} | {s / base_s:.2f}x | {mb / base_mb:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    print(f"python -m gl_jax.main {' '.join(args.run)}; {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    print("| round | mode | wall s | peak MB | test recall@1 |\n|---|---|---|---|---|", flush=True)
    for round_ in range(1, args.rounds + 1):
        for mode in args.modes:
            row = one_run(mode, args.run)
            rows.append(row)
            recall = "-" if row["recall@1"] is None else f"{row['recall@1']:.4f}"
            print(f"| {round_} | {mode} | {row['seconds']:.1f} | {row['peak_mb']:.0f} | "
                  f"{recall} |", flush=True)
    print()
    print(summary(rows, args.modes))
    return rows


if __name__ == "__main__":
    main()
