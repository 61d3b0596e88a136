"""Trains the grid of runs a sweep config declares and writes their table.

    python -m gl_jax.sweep --config=experiments/omniglot/compare.py
    python -m gl_jax.sweep --config=experiments/omniglot/study.py:head_k4 --jobs=2
    python -m gl_jax.sweep --config=experiments/omniglot/study.py:head_k4 --test
    python -m gl_jax.sweep --config=... --report_only

A sweep config is a config file like those in `configs/` (the Omniglot study's are in
`experiments/omniglot/`): `get_config(arg)` returns the setting every run shares and
`sweep(arg)` the grid, a list of points, each a dict of dotted overrides
(`{"loss.name": "triplet", "seed": 1}`). Every point is one ordinary
`gl_jax.train.train_and_evaluate` run, in a process of its own (`--jobs` at a time) and
in its own workdir, named by a digest of its resolved config
(`--root/<config name>/<digest>`): a finished run is never trained again, a half-finished
one resumes from its checkpoint, and the grid can grow.

Validation first, test once: a config may set `evals.final_test = False` (no test
evaluation) and define `test_points(arg)`, the points chosen on the validation split;
`--test` then evaluates exactly those on the test split (the same command with
`evals.final_test = True`: the trainer resumes the finished run and only evaluates).

The table (Markdown, `--report`, default beside the config) has one row per point
without its seed: mean ± sample standard deviation over seeds of the last validation
evaluation and of the test metrics, where evaluated. Text after the notes marker in an
existing report is kept.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from gl_jax import cli
from gl_jax import metric_writers

# The checkout's root: sweep configs import `configs` (and their own folder) from there.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "gl_jax", "sweeps")
NOTES_MARKER = "<!-- Notes below this line are kept when the tables are regenerated. -->"
# Settings that do not change what a run computes: left out of its workdir's digest.
VOLATILE = ("evals.final_test", "logging", "model.features_dir", "checkpoint.preemption_timeout_s")
VAL_COLUMNS = (("recall@1", "val R@1"), ("map@r", "val MAP@R"))
TEST_COLUMNS = (("recall@1", "R@1"), ("recall@2", "R@2"), ("recall@4", "R@4"),
                ("recall@8", "R@8"), ("nmi", "NMI"), ("map@r", "MAP@R"))


# ---------------------------------------------------------------------------- configs
def load_module(path: str):
    """The config file at `path` as a module."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such sweep config")
    if REPO not in sys.path:
        sys.path.insert(0, REPO)   # the configs import `configs.common`
    name = "sweep_config_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        raise ValueError(f"{path} defines no sweep(arg): not a sweep config")
    return module


def split_spec(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def apply(config, point: dict):
    """A copy of `config` with the point's dotted overrides; unknown fields are errors."""
    config = config.copy_and_resolve_references()
    for dotted, value in point.items():
        *sections, field = dotted.split(".")
        node = config
        for section in sections:
            if section not in node:
                raise ValueError(f"sweep point {point}: config has no section {section!r}")
            node = node[section]
        if field not in node:
            raise ValueError(f"sweep point {point}: config has no field {dotted!r}")
        node[field] = value
    return config


def digest(config) -> str:
    """Identifies what a run computes: its resolved config less the VOLATILE fields."""
    tree = json.loads(config.to_json_best_effort())
    for dotted in VOLATILE:
        *sections, field = dotted.split(".")
        node = tree
        for section in sections:
            node = node.get(section, {})
        node.pop(field, None)
    return hashlib.sha1(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def row_label(point: dict, module=None) -> str:
    """The config's `label(point)` if it has one, else the overrides but the seed."""
    shown = {k: v for k, v in point.items() if k != "seed"}
    if module is not None and hasattr(module, "label"):
        return module.label(shown)
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "(base)"


class Sweep:
    """The runs of one sweep config: points, their configs and workdirs."""

    def __init__(self, spec: str, root: str):
        self.spec = spec
        path, self.arg = split_spec(spec)
        self.module = load_module(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        self.name = stem + (f"_{self.arg}" if self.arg else "")
        # A run's workdir depends only on what it computes (its digest), not on which
        # argument listed it: configs whose grids overlap share their runs.
        self.root = os.path.join(root, stem)
        self.points = list(self.module.sweep(self.arg))
        chosen = getattr(self.module, "test_points", None)
        self.test = list(chosen(self.arg)) if chosen else []
        for point in self.test:
            if point not in self.points:
                raise ValueError(f"test point {point} is not a point of the sweep")
        for point in self.points:   # a misspelt field fails here, before any run starts
            self.config(point)

    def config(self, point: dict, final_test: bool | None = None):
        config = apply(self.module.get_config(self.arg), point)
        if final_test is not None:
            config.evals.final_test = final_test
        return config

    def workdir(self, point: dict) -> str:
        return os.path.join(self.root, digest(self.config(point)))


# ------------------------------------------------------------------------------- runs
def finished(workdir: str, need_test: bool) -> bool:
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        return False
    return not need_test or read_json(path).get("test") is not None


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run_point(sweep: Sweep, index: int, test: bool) -> None:
    """Trains (or only evaluates, with `test`) point `index` in this process."""
    # Imported here: the process that schedules the runs and writes the table needs no JAX.
    import jax
    from gl_jax import train
    # Every run of a sweep compiles the same few programs: keep them between processes
    # (in the user's own JAX_COMPILATION_CACHE_DIR where one is set).
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir",
                          os.path.join(os.path.dirname(sweep.root), "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    point = (sweep.test if test else sweep.points)[index]
    config = sweep.config(point, final_test=True if test else None)
    workdir = sweep.workdir(point)
    start = time.time()
    train.train_and_evaluate(config, workdir)
    timing_path = os.path.join(workdir, "timing.json")
    timing = read_json(timing_path) if os.path.isfile(timing_path) else {}
    timing["test_s" if test else "train_s"] = time.time() - start
    with open(timing_path, "w") as f:
        json.dump(timing, f)


def run_all(sweep: Sweep, test: bool, jobs: int, python: str = sys.executable) -> None:
    """Every unfinished point, `jobs` at a time, each in its own process (its output in
    workdir/sweep.log): one failure does not stop the others, and is reported."""
    points = sweep.test if test else sweep.points
    todo = [i for i, p in enumerate(points) if not finished(sweep.workdir(p), test)]
    print(f"{sweep.name}: {len(points) - len(todo)} of {len(points)} "
          f"{'test evaluations' if test else 'runs'} done, {len(todo)} to go", flush=True)

    def one(i: int) -> tuple[int, int, float]:
        workdir = sweep.workdir(points[i])
        os.makedirs(workdir, exist_ok=True)
        start = time.time()
        with open(os.path.join(workdir, "sweep.log"), "a") as log:
            code = subprocess.call(
                [python, "-m", "gl_jax.sweep", f"--config={sweep.spec}",
                 f"--root={os.path.dirname(sweep.root)}", f"--point={i}"]
                + (["--test"] if test else []), stdout=log, stderr=subprocess.STDOUT)
        return i, code, time.time() - start

    failed = []
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        for n, (i, code, seconds) in enumerate(pool.map(one, todo), 1):
            status = "ok" if code == 0 else f"FAILED (exit {code})"
            print(f"[{n}/{len(todo)}] {row_label(points[i], sweep.module)}, seed "
                  f"{points[i].get('seed', '-')}: {status} in {seconds:.0f} s -> "
                  f"{sweep.workdir(points[i])}", flush=True)
            if code:
                failed.append(i)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; their output is in sweep.log in "
                         "their workdirs; running the command again retries them")


# ----------------------------------------------------------------------------- report
def last_validation(workdir: str) -> dict:
    """The metrics of the last validation evaluation in metrics.jsonl ({} if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    found: dict = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                values = {k[4:]: v for k, v in record.items() if k.startswith("val/")}
                if values:
                    found = values
    return found


def collect(sweep: Sweep) -> list[tuple[str, list[dict]]]:
    """(row label, [per-seed {'val', 'test', 'train_s'}]) in the sweep's order."""
    rows: dict[str, list[dict]] = {}
    for point in sweep.points:
        runs = rows.setdefault(row_label(point, sweep.module), [])
        workdir = sweep.workdir(point)
        if not finished(workdir, need_test=False):
            continue
        results = read_json(os.path.join(workdir, "results.json"))
        timing_path = os.path.join(workdir, "timing.json")
        timing = read_json(timing_path) if os.path.isfile(timing_path) else {}
        runs.append({"val": last_validation(workdir), "test": results.get("test") or {},
                     "train_s": timing.get("train_s", float("nan"))})
    return list(rows.items())


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def table(rows: list[tuple[str, list[dict]]]) -> str:
    runs = [r for _, rs in rows for r in rs]
    val = [(k, name) for k, name in VAL_COLUMNS if any(k in r["val"] for r in runs)]
    test = [(k, name) for k, name in TEST_COLUMNS if any(k in r["test"] for r in runs)]
    lines = []
    for label, rs in rows:
        tested = [r for r in rs if r["test"]]
        lines.append([label, len(rs),
                      *(cell([r["val"][k] for r in rs if k in r["val"]]) for k, _ in val),
                      len(tested) if test else None,
                      *(cell([r["test"][k] for r in tested if k in r["test"]]) for k, _ in test),
                      f"{np.nanmean([r['train_s'] for r in rs]):.0f}" if rs else "-"])
        if not test:
            lines[-1].pop(2 + len(val))
    header = (["run", "seeds", *(n for _, n in val)] + (["tested"] if test else [])
              + [f"test {n}" for _, n in test] + ["s/run"])
    return metric_writers.markdown_table(header, lines)


def write_report(sweep: Sweep, path: str, command: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    describe = getattr(sweep.module, "describe", None)
    text = [f"# {sweep.name}", "",
            f"Written by `python -m gl_jax.sweep` on {now} (commit {git_head()}), "
            f"{platform.machine()}, {os.cpu_count()} CPU cores.", "",
            f"Command: `{command}`", ""]
    if describe:
        text += [describe(sweep.arg).strip(), ""]
    text += [table(collect(sweep)), ""]
    notes = "\n(no notes yet)\n"
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
        if NOTES_MARKER in previous:
            notes = previous.split(NOTES_MARKER, 1)[1]
    text += [NOTES_MARKER + notes.rstrip("\n"), ""]
    report = "\n".join(text)
    with open(path, "w") as f:
        f.write(report)
    return report


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------- main
def _one_line_user_errors(fn, *args):
    """``fn(*args)``, a user error (a missing or bad sweep config, a bad value in a point)
    printed as one line, as the other command lines print theirs (`cli.exit_if_user_error`;
    ``GL_JAX_TRACEBACK=1`` keeps the traceback)."""
    try:
        return fn(*args)
    except Exception as e:   # noqa: BLE001 - sorted into user and internal errors
        cli.exit_if_user_error(e)
        raise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="path/to/sweep_config.py[:arg]")
    p.add_argument("--root", default=DEFAULT_ROOT, help="where the runs' workdirs live")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--test", action="store_true",
                   help="evaluate the config's test_points on the test split")
    p.add_argument("--report_only", action="store_true", help="train nothing; write the table")
    p.add_argument("--report", default="", help="Markdown output (default: beside the config, "
                   "its name and arg in capitals, e.g. STUDY_HEAD_K4.md)")
    p.add_argument("--point", type=int, default=-1, help=argparse.SUPPRESS)  # one run, here
    args = p.parse_args(argv)
    sweep = _one_line_user_errors(Sweep, args.config, args.root)
    if args.point >= 0:
        _one_line_user_errors(run_point, sweep, args.point, args.test)
        return
    if not args.report_only:
        run_all(sweep, args.test, args.jobs)
    report = args.report or os.path.join(os.path.dirname(split_spec(args.config)[0]),
                                         sweep.name.upper() + ".md")
    command = "python -m gl_jax.sweep " + " ".join(
        a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--jobs"))
    print(write_report(sweep, report, command))


if __name__ == "__main__":
    main()
