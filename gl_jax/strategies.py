"""Group Loss++ test-time strategies: settings per dataset and the embedding arithmetic.

The strategies (Group Loss++, Elezi et al., TPAMI, arXiv 2204.01509, and the co-author's
code), each a switch, default off:

* ``pool_mix``: pooling ``lambda * maxpool + (1 - lambda) * avgpool`` of the last feature map
  (a model attribute, see ``gl_jax.models``);
* ``leak``: the last block's ReLU becomes leaky with slope ``leak`` (1 = no ReLU; a model
  attribute);
* ``beta``: partial normalisation ``e = x / |x| + beta * x`` (not re-normalised);
* ``rerank``: k-reciprocal re-ranking, final distance
  ``(1 - lambda) * jaccard + lambda * original`` (``gl_jax.evaluation.k_reciprocal_rerank``);
* ``flip``: horizontal-flip test-time augmentation, ``x = (f(image) + f(flip(image))) / 2``
  (a common extra, not from the Group Loss++ code);
* ``ensemble``: several independently trained models, each member's final embedding
  (L2- or partially normalised) concatenated.

This module holds the settings (per-dataset defaults come from the dataset registry,
``gl_jax.data.registry``) and the NumPy operations on embeddings; ``gl_jax.ablation``
applies the model-side switches and computes the metrics.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from gl_jax import data as gdata

STRATEGIES = ("pool_mix", "leak", "beta", "rerank", "flip", "ensemble")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Values of the Group Loss++ switches for one dataset.

    pool_mix: lambda of the mixed pooling, in [0, 1].
    leak: slope of the last activation on the negative side (0 = ReLU, 1 = identity).
    beta: weight of the raw embedding in the partial normalisation, >= 0.
    rerank_k1, rerank_k2, rerank_lambda: k-reciprocal re-ranking (k1 >= 1, k2 >= 1,
      lambda in [0, 1], the weight of the original distance).
    source: where the values come from (printed with the table).
    """
    pool_mix: float
    leak: float
    beta: float
    rerank_k1: int
    rerank_k2: int
    rerank_lambda: float
    source: str

    @property
    def rerank(self) -> dict:
        return {"k1": int(self.rerank_k1), "k2": int(self.rerank_k2),
                "lambda_value": float(self.rerank_lambda)}


# Datasets without published values (and the embedded ones) get CUB's.
FALLBACK = Settings(0.5, 0.75, 0.004, rerank_k1=50, rerank_k2=20, rerank_lambda=0.94,
                    source="not published: CUB values (any other dataset)")


def defaults_for(dataset: str) -> Settings:
    """The dataset registry's Group Loss++ values for `dataset`, or `FALLBACK`."""
    values = gdata.DATASETS[dataset].strategies if dataset in gdata.DATASETS else None
    return FALLBACK if values is None else Settings(**values)


def settings_for(dataset: str, **overrides) -> Settings:
    """The defaults of ``dataset`` (``defaults_for``), with every override
    that is not None applied and checked.

    >>> settings_for("sop", beta=0.001).beta
    0.001
    """
    base = defaults_for(dataset)
    fields = {f.name for f in dataclasses.fields(Settings)} - {"source"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown Group Loss++ setting(s) {sorted(unknown)}; known: "
                         f"{sorted(fields)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    s = dataclasses.replace(base, **given,
                            source=base.source + (" + overrides " + str(sorted(given))
                                                  if given else ""))
    if not 0.0 <= s.pool_mix <= 1.0:
        raise ValueError(f"pool_mix must be in [0, 1], got {s.pool_mix}")
    if not np.isfinite(s.leak):
        raise ValueError(f"leak must be a finite float, got {s.leak}")
    if not (np.isfinite(s.beta) and s.beta >= 0.0):
        raise ValueError(f"beta must be a finite float >= 0, got {s.beta}")
    if int(s.rerank_k1) < 1 or int(s.rerank_k2) < 1:
        raise ValueError(f"rerank_k1 and rerank_k2 must be >= 1, got {s.rerank_k1}, "
                         f"{s.rerank_k2}")
    if not 0.0 <= s.rerank_lambda <= 1.0:
        raise ValueError(f"rerank_lambda must be in [0, 1], got {s.rerank_lambda}")
    return s


def parse_strategies(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """'auto' / None / '' -> None (every strategy that applies); otherwise a checked tuple.

    Accepts a comma-separated string ('rerank,flip') or a sequence; 'all' = every name."""
    if value is None:
        return None
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    if not items or items == ["auto"]:
        return None
    if items == ["all"]:
        return STRATEGIES
    unknown = [v for v in items if v not in STRATEGIES]
    if unknown:
        raise ValueError(f"--evaluate.strategies: unknown strategy {unknown}; known: "
                         f"{list(STRATEGIES)} (or 'auto', 'all')")
    return tuple(dict.fromkeys(items))


def _check_2d(name: str, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (n, d) with n, d >= 1; got {x.shape}")
    return x


def l2_normalize(x) -> np.ndarray:
    """Rows divided by their L2 norm: ``x / max(|x|, 1e-12)``; (n, d) -> (n, d) float32."""
    x = _check_2d("x", x)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def partial_normalize(x, beta: float) -> np.ndarray:
    """Group Loss++ partial normalisation ``e = x / |x| + beta * x`` per row (not
    re-normalised: rows with a large norm keep a little of it). beta = 0 is plain L2
    normalisation. (n, d) -> (n, d) float32."""
    if not (np.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite float >= 0, got {beta}")
    x = _check_2d("x", x)
    return (l2_normalize(x) + np.float32(beta) * x).astype(np.float32)


def flip_average(embedding, flipped) -> np.ndarray:
    """Flip test-time augmentation: ``(f(image) + f(flip(image))) / 2``; the mean, not the
    sum, keeps the raw scale that ``beta`` multiplies. Both (n, d) -> (n, d)."""
    a, b = _check_2d("embedding", embedding), _check_2d("flipped", flipped)
    if a.shape != b.shape:
        raise ValueError(f"embedding and flipped differ in shape: {a.shape} vs {b.shape}")
    return ((a + b) * np.float32(0.5)).astype(np.float32)


def finalize(raw, beta: float | None) -> np.ndarray:
    """A member's final embedding: L2-normalised (beta None) or partially normalised."""
    return l2_normalize(raw) if beta is None else partial_normalize(raw, beta)


def concatenate(members: Sequence[np.ndarray]) -> np.ndarray:
    """Ensemble: members' final embeddings [(n, d_m)] -> (n, sum d_m), side by side.

    With L2-normalised members the squared distance of the concatenation is the sum of the
    members' squared distances, so every member counts equally whatever its dimension."""
    if not members:
        raise ValueError("concatenate needs at least one member embedding")
    arrays = [_check_2d(f"members[{i}]", m) for i, m in enumerate(members)]
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"ensemble members embed different numbers of items: "
                         f"{[a.shape for a in arrays]}")
    return np.concatenate(arrays, axis=1)
