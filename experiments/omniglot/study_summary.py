"""The study's summary: test Recall@1 of the final rows of every regime and budget.

    python -m experiments.omniglot.study_summary [--root=~/.cache/gl_jax/sweeps]

Reads the finished runs of `study.py`'s four regimes (nothing is trained) and prints, per
regime and budget, the Group Loss at the chosen setting (the new defaults) and at the
centre (the old defaults), cross-entropy alone and every baseline: validation and test
Recall@1 (mean ± sample std over seeds, %), then the two differences the issue asks
about, on test: new Group Loss defaults minus cross-entropy, and minus the best baseline
(the best by validation Recall@1, so that the test split chooses nothing here either).
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from gl_jax import metric_writers
from gl_jax import sweep as sweep_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REGIMES = ("head_k4", "head_k9", "full_k4", "full_k9")


def final_rows(regime: str, root: str) -> dict[int, dict[str, list[dict]]]:
    """{epochs: {row name: [runs]}} of the final rows (their runs with test metrics)."""
    sweep = sweep_lib.Sweep(os.path.join(HERE, f"study.py:{regime}"), root)
    finals = [p for p in sweep.points if p.get("evals.final_test")] + sweep.test
    out: dict[int, dict[str, list[dict]]] = {}
    for point in finals:
        name = point["loss.name"]
        if name == "group_loss":
            name = "Group Loss, new defaults" if "loss.ce_weight" in point else (
                "Group Loss, old defaults")
        workdir = sweep.workdir(point)
        runs = out.setdefault(point["schedule.epochs"], {}).setdefault(name, [])
        if sweep_lib.finished(workdir, need_test=True):
            results = sweep_lib.read_json(os.path.join(workdir, "results.json"))
            runs.append({"val": sweep_lib.last_validation(workdir)["recall@1"],
                         "test": results["test"]["recall@1"]})
    return out


def exploration(root: str) -> str:
    """Validation Recall@1 of every Group Loss setting of the `.explore` look (short
    budget) per regime, and its mean difference from the centre over the regimes: the
    table CHOSEN was read from."""
    values: dict[str, dict[str, list[float]]] = {}
    for regime in REGIMES:
        sweep = sweep_lib.Sweep(os.path.join(HERE, f"study.py:{regime}.explore"), root)
        for label, runs in sweep_lib.collect(sweep):
            if ", group_loss" in label:
                setting = label.split(", group_loss", 1)[1].lstrip(", ") or "centre (old defaults)"
                values.setdefault(setting, {})[regime] = [100 * r["val"]["recall@1"]
                                                          for r in runs]
    centre = values["centre (old defaults)"]
    lines = []
    for setting, per_regime in values.items():
        deltas = [np.mean(per_regime[r]) - np.mean(centre[r]) for r in REGIMES
                  if per_regime.get(r) and centre.get(r)]
        lines.append([setting, *(f"{np.mean(per_regime[r]):.1f} ({len(per_regime[r])})"
                                 if per_regime.get(r) else "-" for r in REGIMES),
                      f"{np.mean(deltas):+.2f}"])
    return metric_writers.markdown_table(
        ["Group Loss setting", *(f"{r} val R@1 (seeds)" for r in REGIMES),
         "mean - centre"], lines)


def summary(root: str) -> str:
    lines, verdicts = [], []
    for regime in REGIMES:
        for epochs, rows in sorted(final_rows(regime, root).items()):
            stats = {name: (np.mean([r["val"] for r in runs]) if runs else np.nan,
                            [r["test"] for r in runs]) for name, runs in rows.items()}
            for name, (_, tests) in stats.items():
                lines.append([regime, epochs, name, len(tests),
                              sweep_lib.cell([r["val"] for r in rows[name]]),
                              sweep_lib.cell(tests)])
            baselines = {n: s for n, s in stats.items() if not n.startswith("Group Loss")
                         and n != "cross_entropy"}
            best = max(baselines, key=lambda n: baselines[n][0])
            new = np.mean(stats["Group Loss, new defaults"][1]) * 100
            verdicts.append([regime, epochs,
                             f"{new - np.mean(stats['cross_entropy'][1]) * 100:+.1f}",
                             best, f"{new - np.mean(baselines[best][1]) * 100:+.1f}"])
    table = metric_writers.markdown_table(
        ["regime", "epochs", "run", "seeds", "val R@1", "test R@1"], lines)
    gaps = metric_writers.markdown_table(
        ["regime", "epochs", "new GL - CE (test R@1, points)",
         "best baseline (by val)", "new GL - best baseline"], verdicts)
    return table + "\n\n" + gaps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=sweep_lib.DEFAULT_ROOT)
    root = p.parse_args().root
    print(exploration(root) + "\n\n" + summary(root))


if __name__ == "__main__":
    main()
