"""A smoke test on scikit-learn's bundled 8x8 digits, nothing to download.

    python -m gl_jax.main --config=configs/digits.py --workdir=/tmp/gl_digits
    python -m gl_jax.main --config=configs/digits.py:quick --workdir=/tmp/gl_digits_quick

Train on digits 0-4 (901 images), test on the unseen digits 5-9 (896 images), upsampled to
16 px, with a small 3-layer CNN (64-d pooled embedding): 2 warm-up epochs of
cross-entropy, then 8 Group Loss epochs. Hardware: any CPU; about 1-2 minutes on 2 cores,
`:quick` (used by the tests) about 15 s after compilation.

What to expect, honestly: the training digits are learned (train accuracy and the
Group Loss improve), and the run prints the held-out digits' Recall@K, MAP@R and NMI
(Recall@1 about 0.94-0.95). It does NOT beat the same network untrained on the held-out
digits (Recall@1 about 0.977, raw pixels 0.991): five training classes are too few to
learn features that transfer to five new ones. It is a smoke test of the whole pipeline
that needs nothing downloaded; `configs/image_folder.py:quick` on Omniglot (68 training
characters) shows held-out learning on CPU.
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("digits")
    config.model.name = "small_cnn"
    config.sampler.classes_per_batch = 4
    config.sampler.samples_per_class = 8
    config.loss.temperature = 10.0
    config.loss.anchors_per_class = 2
    config.optimizer.lr = 1e-2
    config.optimizer.weight_decay = 1e-4
    config.schedule.epochs = 8
    config.schedule.lr_drop_epochs = (6,)
    config.schedule.lr_drop_factors = (0.1,)
    config.warmup.epochs = 2
    # Trained from scratch, not fine-tuned: the usual Adam eps instead of the recipe's 1e-2.
    config.warmup.lr = 1e-2
    config.warmup.eps = 1e-8
    config.warmup.classes_per_batch = 4
    config.warmup.samples_per_class = 8
    config.evals.batch_size = 128
    config.checkpoint.every_steps = 50
    config.logging.every_steps = 10
    if arg == "quick":
        config.schedule.epochs = 3
        config.schedule.steps_per_epoch = 10
        config.schedule.lr_drop_epochs = (3,)
        config.warmup.epochs = 1
        config.warmup.steps_per_epoch = 10
        config.evals.nmi = False
        config.checkpoint.every_steps = 5
        config.logging.every_steps = 5
    elif arg:
        raise ValueError(f"configs/digits.py takes no argument or 'quick', got {arg!r}")
    return config
