"""The optimizers of the training stages: RAdam with decoupled weight decay, a
piecewise-constant learning rate, and an optional larger step for the classifier."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


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


def _in_classifier(params):
    """True for the leaves under the model's `classifier` (the proxies of proxy losses)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "classifier", params)


def _radam_decoupled(learning_rate, weight_decay, b1, b2, eps, classifier_lr_multiplier):
    # Decoupled weight decay: the decay is added after RAdam's rescaling, so the step is
    # p <- p - lr * (radam_direction + wd * p), as torch's RAdam(decoupled_weight_decay).
    parts = [optax.scale_by_radam(b1=b1, b2=b2, eps=eps),
             optax.add_decayed_weights(weight_decay)]
    if classifier_lr_multiplier != 1.0:
        # A larger lr for the classifier alone, as Proxy-Anchor trains its proxies (x100);
        # the decay term is scaled with it, as in a torch parameter group with its own lr.
        parts.append(optax.masked(optax.scale(classifier_lr_multiplier), _in_classifier))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def make_optimizer(learning_rate, *, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                   classifier_lr_multiplier=1.0):
    """RAdam with decoupled weight decay; the lr (a float or schedule) is logged from the state.

    `classifier_lr_multiplier` scales the steps of the classifier's weights (the proxies
    of the proxy-based losses) relative to the rest of the model."""
    return optax.inject_hyperparams(_radam_decoupled, static_args=("classifier_lr_multiplier",))(
        learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps,
        classifier_lr_multiplier=float(classifier_lr_multiplier))
