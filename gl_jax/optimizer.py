"""The optimizers of the training stages: RAdam (the paper's) or AdamW, with decoupled
weight decay, a piecewise-constant learning rate, and larger steps for the parts of the
model that start from scratch (the embedding layer, the classifier / proxies)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("radam", "adamw")


def lr_schedule(base_lr: float, boundaries, factors) -> Callable[[jax.Array], jax.Array]:
    """Piecewise-constant lr: `base_lr * factors[i]` from step `boundaries[i]` on.

    Factors are relative to the initial lr (not cumulative), as the original code sets
    `lr / 10` at each drop."""
    boundaries, factors = tuple(int(b) for b in boundaries), tuple(float(f) for f in factors)

    def schedule(count):
        lr = jnp.asarray(base_lr, jnp.float32)
        for boundary, factor in zip(boundaries, factors):
            lr = jnp.where(count >= boundary, base_lr * factor, lr)
        return lr
    return schedule


def _under(part: str, params):
    """True for the leaves under the model's top-level attribute `part`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == part, params)


def _chain(learning_rate, weight_decay, b1, b2, eps, name, head_lr_multiplier,
           classifier_lr_multiplier):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
    direction = (optax.scale_by_radam(b1=b1, b2=b2, eps=eps) if name == "radam"
                 else optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    # Decoupled weight decay, added after the adaptive rescaling: the step is
    # p <- p - lr * (direction + wd * p), as torch's AdamW and RAdam(decoupled_weight_decay).
    parts = [direction, optax.add_decayed_weights(weight_decay)]
    # A part's multiplier scales its whole step, decay included, as a torch parameter
    # group with its own lr does (the recipe of pytorch-metric-learning's examples: the
    # new head x10, Proxy-Anchor's proxies x100 the backbone's lr).
    for part, multiplier in (("embedding", head_lr_multiplier),
                             ("classifier", classifier_lr_multiplier)):
        if multiplier != 1.0:
            parts.append(optax.masked(optax.scale(multiplier), functools.partial(_under, part)))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(learning_rate, *, name="radam", weight_decay=0.0, b1=0.9, b2=0.999,
                   eps=1e-8, head_lr_multiplier=1.0, classifier_lr_multiplier=1.0):
    """RAdam or AdamW with decoupled weight decay; the lr (a float or schedule) is logged
    from the state.

    `head_lr_multiplier` and `classifier_lr_multiplier` scale the steps of the embedding
    layer and of the classifier's weights (the proxies of the proxy-based losses) relative
    to the backbone's."""
    return optax.inject_hyperparams(
        _chain, static_args=("name", "head_lr_multiplier", "classifier_lr_multiplier"))(
        learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
        name=str(name), head_lr_multiplier=float(head_lr_multiplier),
        classifier_lr_multiplier=float(classifier_lr_multiplier))
