"""gl_jax.optimizer: the schedule, decoupled weight decay, AdamW against optax's, and the
per-part learning rates (backbone, embedding layer, classifier)."""
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from gl_jax import optimizer, runtime, train
from train_helpers import quick_config


def _tree(seed):
    rng = np.random.default_rng(seed)
    shapes = {"backbone": {"w": (3, 2)}, "embedding": {"kernel": (2, 4)},
              "classifier": {"kernel": (4, 5)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def test_lr_schedule_factors_are_relative_to_the_initial_lr():
    schedule = optimizer.lr_schedule(1e-3, boundaries=(10, 20), factors=(0.1, 0.1))
    got = [float(schedule(s)) for s in (0, 9, 10, 19, 20, 100)]
    np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4], rtol=1e-6)


@pytest.mark.parametrize("name", optimizer.OPTIMIZERS)
def test_weight_decay_is_decoupled(name):
    """With a zero gradient the adaptive direction is 0: the step is exactly -lr * wd * p."""
    params = {"w": jnp.array([1.0, -2.0, 4.0])}
    tx = optimizer.make_optimizer(0.1, name=name, weight_decay=0.01)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                               params["w"] * (1 - 0.1 * 0.01), rtol=1e-6)


def test_adamw_equals_optax_adamw_over_several_steps():
    params, reference = _tree(0), _tree(0)
    ours = optimizer.make_optimizer(1e-3, name="adamw", weight_decay=1e-4, eps=1e-8)
    theirs = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4)
    state, ref_state = ours.init(params), theirs.init(reference)
    for step in range(5):
        grads = _tree(100 + step)
        updates, state = ours.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_updates, ref_state = theirs.update(grads, ref_state, reference)
        reference = optax.apply_updates(reference, ref_updates)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    assert not np.allclose(jax.tree.leaves(params)[0], jax.tree.leaves(_tree(0))[0])


@pytest.mark.parametrize("name", optimizer.OPTIMIZERS)
def test_part_multipliers_scale_only_the_parts_they_name(name):
    """The whole step of a part, decay included, is multiplied: a torch parameter group
    with its own lr."""
    params, grads = _tree(1), _tree(2)

    def first_update(head, classifier):
        tx = optimizer.make_optimizer(1e-2, name=name, weight_decay=0.1,
                                      head_lr_multiplier=head,
                                      classifier_lr_multiplier=classifier)
        return tx.update(grads, tx.init(params), params)[0]

    plain, scaled = first_update(1.0, 1.0), first_update(10.0, 100.0)
    for part, factor in (("backbone", 1.0), ("embedding", 10.0), ("classifier", 100.0)):
        for got, want in zip(jax.tree.leaves(scaled[part]), jax.tree.leaves(plain[part])):
            assert np.all(np.asarray(want) != 0)
            np.testing.assert_allclose(got, factor * np.asarray(want), rtol=1e-6)


def test_config_fields_reach_the_group_stage_optimizer():
    """optimizer.name and the multipliers of a config shape the metric-loss stage's steps
    on the model's own parameter tree; the warm-up keeps RAdam with one lr."""
    config = quick_config(optimizer__name="adamw", optimizer__head_lr_multiplier=10.0,
                          optimizer__classifier_lr_multiplier=100.0, model__embedding_dim=8)
    warmup, group = train.make_stages(config, runtime.load_splits(config)["train"])
    from flax import nnx
    _, params, _ = nnx.split(runtime.build_model(config, 5), nnx.Param, ...)
    grads = jax.tree.map(jnp.ones_like, params)
    reference = optimizer.make_optimizer(float(config.optimizer.lr), name="adamw",
                                         weight_decay=float(config.optimizer.weight_decay))
    plain = reference.update(grads, reference.init(params), params)[0]
    for stage, factors in ((group, {"backbone": 1, "embedding": 10, "classifier": 100}),
                           (warmup, None)):
        updates = stage.tx.update(grads, stage.tx.init(params), params)[0]
        for part in ("backbone", "embedding", "classifier"):
            got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(updates[part])])
            want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(plain[part])])
            if factors:
                np.testing.assert_allclose(got, factors[part] * want, rtol=1e-5)
            else:   # the warm-up's single lr on every part
                assert np.allclose(got / got[0], np.ones_like(got), rtol=1e-3)


@pytest.mark.parametrize("field,value", [("name", "sgd"), ("head_lr_multiplier", 0.0),
                                         ("classifier_lr_multiplier", float("inf"))])
def test_bad_optimizer_fields_are_named(field, value):
    from gl_jax import config_checks
    config = quick_config(**{f"optimizer__{field}": value})
    with pytest.raises(ValueError, match=f"config.optimizer.{field}"):
        config_checks.validate_fields(config)
