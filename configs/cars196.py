"""Cars196 with the paper's recipe (Elezi et al., ECCV 2020, and the official code).

    python -m gl_jax.main --config=configs/cars196.py --config.data.root=/data/cars196 \
        --config.model.init_from=/ckpt/bninception --workdir=W
    python -m gl_jax.main --config=configs/cars196.py:quick --config.data.root=... --workdir=W

Data: `<root>/images/<class>/*.jpg` (the original code's layout; `data.name='tfds_cars196'`
reads a prepared TFDS copy instead); classes 1-98 train, 99-196 test. BN-Inception,
5 x 7 batches, 3 anchors per class, T = 79, RAdam lr 2e-4, weight decay 4.86e-7, 70
epochs, drops at 31 and 51, classification fine-tuning first (it matters: 72.3 -> 85.0
Recall@1 for a user of the original code).
Hardware: one GPU. Expected (paper): Recall@1 85.6, NMI 72.7 (unconfirmed).
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("cars196")
    config.model.name = "bninception"
    config.loss.temperature = 79.0
    config.loss.anchors_per_class = 3
    common.paper_group_loss(config)
    config.optimizer.lr = 2e-4
    config.optimizer.weight_decay = 4.86e-7
    if arg == "quick":
        common.quick(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
    return config
