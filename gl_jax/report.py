"""What a training run tells the person watching it: the printed lines (`say`, `headline`),
the step metrics in `metrics.jsonl` and TensorBoard (`StepMetrics`, which also stops a
diverged run), and its final word, `results.json` with the test table (`final_results`)."""
from __future__ import annotations

import json
import math
import os
import sys

import jax
import numpy as np
import tqdm

from gl_jax import metric_writers
from gl_jax.errors import NonFiniteLossError


def say(message: str) -> None:
    """A line for the person watching (process 0 only), printed between progress bars;
    library chatter goes to absl logging, which the command line keeps at WARNING."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def headline(metrics: dict) -> str:
    """'recall@1 0.4123, map@r 0.1234' (the first rank metric and MAP@R / mAP)."""
    keys = [k for k in ("recall@1", "rank@1", "map@r", "map") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


class StepMetrics:
    """One stage's step metrics still on the device, read back in groups (a read-back is a
    host sync), checked, and their averages written to `writer` (None: not written)."""

    def __init__(self, writer: metric_writers.MetricWriter | None, stage_name: str,
                 checkpoint_dir: str, last_good: int | None):
        self.writer, self.stage_name, self.checkpoint_dir = writer, stage_name, checkpoint_dir
        self.last_good = last_good    # the step of the newest checkpoint, None before one
        self.pending: list[tuple[int, dict]] = []

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> None:
        """Reads pending metrics back, stops on a non-finite loss or parameters, logs the
        averages. Every checkpoint is saved right after a flush, so a saved state always
        has finite parameters and came from finite losses."""
        if not self.pending:
            return
        rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()})
                for s, m in self.pending]
        self.pending = []
        for s, row in rows:
            bad = [k for k in ("loss", "param_norm") if not math.isfinite(row.get(k, 0.0))]
            if bad:
                where = (f"The last checkpoint, step {self.last_good} in "
                         f"{self.checkpoint_dir}, has finite parameters "
                         "(checked at save) and intact files (checked at restore): rerunning "
                         "the same command resumes from it, and will likely meet the same "
                         "values unless the config changes (e.g. a lower "
                         "--config.optimizer.lr)" if self.last_good is not None
                         else "No checkpoint was saved yet.")
                raise NonFiniteLossError(
                    f"non-finite {bad[0]} {row[bad[0]]} at step {s} ({self.stage_name} stage). "
                    f"{where}")
        if self.writer:
            mean = {f"{self.stage_name}/{k}": float(np.mean([r[k] for _, r in rows]))
                    for k in rows[0][1]}
            self.writer.write(rows[-1][0], mean)


def final_results(workdir: str, meta: dict, protocol_name: str, metrics: dict | None, *,
                  evaluated_step: int | None = None, unrestored: str | None = None) -> None:
    """Writes `workdir/results.json` (process 0) and prints the test metrics of the selected
    model, beside those before training where the run measured them.

    `meta`: the run's bookkeeping (best epoch, step and score; `untrained_test`);
    `metrics`: the test metrics, None when the run was not evaluated on the test split;
    `evaluated_step`: the step of the model those metrics are of (`evaluated_step` in
    results.json, beside `selected_step`); `unrestored`: why the selected model could not
    be restored, when the final model was evaluated in its place."""
    if metrics is None:
        _write(workdir, {"protocol": protocol_name, "selected_epoch": meta["best_epoch"],
                         "selected_step": meta["best_step"],
                         "selection_score": meta["best_score"], "evaluated_step": None,
                         "test": None,
                         "note": "not evaluated on the test split "
                                 "(config.evals.final_test = False)"})
        say("\nNo test evaluation (config.evals.final_test = False); the same command with "
            "--config.evals.final_test=True evaluates this run's selected model.\n")
        _say_use_commands(workdir)
        return
    if unrestored is not None:
        note = (f"NOT the selected model (epoch {meta['best_epoch']}, step "
                f"{meta['best_step']}), which could not be restored ({unrestored}): the final "
                f"model, step {evaluated_step}")
    elif meta["best_step"] < 0:
        note = "the final model: no evaluation during training selected one"
    elif protocol_name == "paper":
        note = ("model selected on the TEST split (paper protocol), epoch "
                f"{meta['best_epoch']}: these numbers are optimistic")
    else:
        note = f"model selected on the validation split, epoch {meta['best_epoch']}"
    results = {"protocol": protocol_name, "note": note, "selected_epoch": meta["best_epoch"],
               "selected_step": meta["best_step"], "selection_score": meta["best_score"],
               "evaluated_step": evaluated_step, "test": metrics}
    before = meta.get("untrained_test")
    if before:
        results["untrained_test"] = before
        results["gain"] = {k: v - before[k] for k, v in metrics.items()
                           if isinstance(v, float) and k in before}
    _write(workdir, results)
    names = [k for k, v in metrics.items() if isinstance(v, float)]
    if before:
        table = metric_writers.markdown_table(
            ["held-out metric", "before training", "after training", "gain"],
            [[k, before[k], metrics[k], f"{metrics[k] - before[k]:+.4f}"] for k in names])
    else:
        table = metric_writers.markdown_table(["held-out metric", "value"],
                                              [[k, metrics[k]] for k in names])
    say(f"\nTest metrics ({note}):\n{table}\n")
    _say_use_commands(workdir)


def _say_use_commands(workdir: str) -> None:
    """The run's last lines: how to embed its held-out images and search them."""
    if jax.process_index() == 0:
        from gl_jax import embed   # the commands' grammar lives there
        say(embed.use_commands(workdir) + "\n")


def _strict(value):
    """`value` with every non-finite float replaced by None: strict JSON, which jq and
    JavaScript read (the json module would write NaN and -Infinity)."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _write(workdir: str, results: dict) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(_strict(results), f, indent=2, allow_nan=False)
