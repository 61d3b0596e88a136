"""CUB-200-2011 with the paper's recipe (Elezi et al., ECCV 2020, and the official code).

    python -m gl_jax.main --config=configs/cub200.py --config.data.root=/data/CUB_200_2011 \
        --config.model.init_from=/ckpt/bninception --workdir=W
    python -m gl_jax.main --config=configs/cub200.py:quick --config.data.root=... --workdir=W

Data: the released layout (`images.txt`, `image_class_labels.txt`, `images/`); classes
1-100 train, 101-200 test. Backbone: BN-Inception from converted Caffe-port ImageNet
weights (`python -m gl_jax.convert_weights`), pooled 1024-d embedding; 6 x 9 batches,
2 anchors per class, T = 24, RAdam lr 1.5637e-4, weight decay 6.06e-6, 70 epochs with
lr drops at 31 and 51, 10 epochs of classification fine-tuning first.
Hardware: one GPU (about 3 h on a V100-class GPU for the original). Expected (paper,
BN-Inception, test-set model selection): Recall@1 65.5, NMI 69.0 (unconfirmed).
`:quick` shrinks it to a CPU-sized smoke run (ResNet-18 at 32 px, a few steps).
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("cub200")
    config.model.name = "bninception"
    config.loss.temperature = 24.0
    config.loss.anchors_per_class = 2
    common.paper_group_loss(config)
    config.optimizer.lr = 1.5637e-4
    config.optimizer.weight_decay = 6.06e-6
    if arg == "quick":
        common.quick(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
    return config
