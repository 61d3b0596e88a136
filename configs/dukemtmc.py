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
    return common.reid_config("dukemtmc", arg)
