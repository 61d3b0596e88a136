"""Market-1501 person re-identification with the Group Loss.

    python -m gl_jax.main --config=configs/market1501.py --config.data.root=/data/market1501 \
        --config.model.init_from=/ckpt/resnet50 --workdir=W

Data: `bounding_box_train/`, `query/`, `bounding_box_test/` (751 training identities; 3,368 queries against 19,732 gallery images, 6 cameras); id and camera
from the file names, junk images dropped, distractors kept in the gallery.
Metrics: CMC rank-1/5/10, mAP and mINP, same-id same-camera gallery images removed.
Backbone: ResNet-50 from converted torchvision ImageNet weights, ImageNet normalisation,
square 224 px inputs (the data pipeline crops squares; re-id usually uses 256 x 128).
Hyperparameters: the CUB recipe, not tuned for re-id. Hardware: one GPU.
The re-id strong baseline (BoT, ResNet-50) reaches rank-1 94.5, mAP 85.9 on Market-1501; the Group Loss papers report no re-id numbers.
"""
from configs import common


def get_config(arg: str | None = None):
    return common.reid_config("market1501", arg)
