"""The pytorch-metric-learning rows of STUDY.md from pml_baseline.py's JSON files, in the
sweep table's columns (mean ± sample sd over seeds, in %):

    python experiments/finetune/pml_summary.py ~/.cache/gl_jax/pml/ms_seed*.json
"""
import json
import sys

import numpy as np

COLUMNS = (("val", "recall@1", "val R@1"), ("val", "map@r", "val MAP@R"),
           ("test", "recall@1", "R@1"), ("test", "recall@2", "R@2"),
           ("test", "recall@4", "R@4"), ("test", "recall@8", "R@8"),
           ("test", "map@r", "MAP@R"))


def cell(values) -> str:
    values = 100.0 * np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    by_loss = {}
    for run in runs:
        by_loss.setdefault(run["settings"]["loss"], []).append(run)
    print("| run | seeds | " + " | ".join(c[2] for c in COLUMNS) + " | train s/step |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for loss, group in sorted(by_loss.items()):
        cells = [cell([r[split][metric] for r in group]) if all(split in r for r in group)
                 else "-" for split, metric, _ in COLUMNS]
        step = np.mean([r["train"]["s_per_step"] for r in group])
        print(f"| pytorch-metric-learning {loss} | {len(group)} | " + " | ".join(cells)
              + f" | {step:.2f} |")
    untrained = [r["untrained_test"] for r in runs if "untrained_test" in r]
    if untrained:
        print(f"\nbefore training (random embedding layer), test: R@1 "
              f"{cell([u['recall@1'] for u in untrained])}, MAP@R "
              f"{cell([u['map@r'] for u in untrained])}")


if __name__ == "__main__":
    main(sys.argv[1:])
