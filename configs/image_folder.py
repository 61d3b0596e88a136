"""Any image-folder dataset: one folder per class (nested folders allowed).

    python -m gl_jax.main --config=configs/image_folder.py --config.data.root=DIR --workdir=W
    python -m gl_jax.main --config=configs/image_folder.py:quick --config.data.root=DIR --workdir=W

The first half of the sorted classes train, the rest test (`data.train_classes` changes
the cut). Defaults follow the paper's recipe (BN-Inception, 227 px, 6 x 9 batches, the
CUB hyperparameters) and expect a GPU: about 1 s per step on one modern GPU.

`:quick` is CPU-sized: the small CNN at 32 px, 6 epochs of 40 steps, minutes on 2 cores.
On the Omniglot copy (`../shared/datasets/omniglot/images_background_small1.zip`
unzipped; 68 training and 68 test characters) it lifts held-out Recall@1 from about
0.35 (the same network untrained) to about 0.6; see README for the measured numbers.
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("image_folder")
    config.sampler.classes_per_batch = 6
    config.sampler.samples_per_class = 9
    config.loss.temperature = 24.0
    config.loss.anchors_per_class = 2
    config.optimizer.lr = 1.5637e-4
    config.optimizer.weight_decay = 6.06e-6
    if arg == "quick":
        config.model.name = "small_cnn"
        config.data.image_size = 32
        config.data.resize_size = 32
        config.data.normalization = "unit"
        config.data.augment = False
        config.optimizer.lr = 1e-3
        config.loss.temperature = 10.0
        config.warmup.epochs = 0
        config.schedule.epochs = 6
        config.schedule.steps_per_epoch = 40
        config.schedule.lr_drop_epochs = (5,)
        config.schedule.lr_drop_factors = (0.1,)
        config.evals.nmi = False
        config.checkpoint.every_steps = 40
    elif arg:
        raise ValueError(f"configs/image_folder.py takes no argument or 'quick', got {arg!r}")
    return config
