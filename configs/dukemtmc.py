"""DukeMTMC-reID person re-identification with the Group Loss.

    python -m gl_jax.main --config=configs/dukemtmc.py --config.data.root=/data/dukemtmc \
        --config.model.init_from=/ckpt/resnet50 --workdir=W

Data: `bounding_box_train/`, `query/`, `bounding_box_test/` (702 training identities; 2,228 queries against 17,661 gallery images, 8 cameras); id and camera
from the file names, junk images dropped, distractors kept in the gallery.
Metrics: CMC rank-1/5/10, mAP and mINP, same-id same-camera gallery images removed.
Backbone: ResNet-50 from converted torchvision ImageNet weights, ImageNet normalisation,
square 224 px inputs (the data pipeline crops squares; re-id usually uses 256 x 128).
Hyperparameters: the CUB recipe, not tuned for re-id. Hardware: one GPU.
The Group Loss papers report no re-id numbers.
"""
from configs import common


def get_config(arg: str | None = None):
    config = common.get_config("dukemtmc")
    config.model.name = "resnet50"
    config.data.normalization = "imagenet"
    config.data.image_size = 224
    config.data.resize_size = 256
    config.sampler.classes_per_batch = 8
    config.sampler.samples_per_class = 4
    config.loss.temperature = 24.0
    config.loss.anchors_per_class = 1
    config.optimizer.lr = 1.5637e-4
    config.optimizer.weight_decay = 6.06e-6
    config.evals.ks = (1, 5, 10)
    config.evals.nmi = False
    config.selection.metric = "rank@1"
    if arg == "quick":
        common.quick(config)
        config.evals.ks = (1, 5)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
    return config
