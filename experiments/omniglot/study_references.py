"""The study's references: what each regime's network gives before any training.

    python -m experiments.omniglot.study_references

- head regimes: the frozen ImageNet EfficientNet-Lite0's pooled 1280-d features as they
  are (what a head that learned nothing would pass on), from the features cache the
  study's runs fill (`model.features_dir`), else computed;
- full regimes: the small CNN at its random initialisation (seeds 0, 1, 2).

Validation and test characters of `study.py`'s splits; Recall@1 and MAP@R in %. Neither
depends on a setting the study chooses, so the test split is not used to choose anything.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from experiments.omniglot import study
from gl_jax import metric_writers, protocol, runtime

METRICS = ("recall@1", "map@r")


def split_metrics(config, seed: int) -> dict[str, dict]:
    config = config.copy_and_resolve_references()
    config.seed = seed
    splits = runtime.load_splits(config)
    mesh = runtime.make_mesh(config.mesh)
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    out = {}
    for split in ("val", "test"):
        if config.model.freeze_backbone:
            features = runtime.backbone_features(graphdef, params, model_state, splits[split],
                                                 config, mesh, split=split)
            embedded = {split: {"embedding": features, "label": splits[split].labels}}
            out[split] = protocol.metrics("retrieval", embedded, config, nmi=False)
        else:
            out[split] = protocol.evaluate_split(runtime.Embedder(graphdef, mesh), params,
                                                 model_state, splits, split, config, mesh)
    return out


def main():
    rows = []
    for backbone, label, seeds in (("head", "frozen Lite0 features (1280-d), no head", (0,)),
                                   ("full", "small CNN at initialisation", study.SEEDS)):
        config = study.get_config(f"{backbone}_k4")   # K does not change the network
        runs = [split_metrics(config, seed) for seed in seeds]
        cells = []
        for split in ("val", "test"):
            for key in METRICS:
                values = [100 * r[split][key] for r in runs]
                cells.append(f"{np.mean(values):.1f}" + (
                    f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""))
        rows.append([f"{backbone}: {label}", len(seeds), *cells])
    print(metric_writers.markdown_table(
        ["reference", "seeds", "val R@1", "val MAP@R", "test R@1", "test MAP@R"], rows))


if __name__ == "__main__":
    main()
