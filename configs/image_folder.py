"""Any image-folder dataset: one folder per class (nested folders allowed).

    python -m gl_jax.main --config=configs/image_folder.py --config.data.root=DIR --workdir=W
    python -m gl_jax.main --config=configs/image_folder.py:quick --config.data.root=DIR --workdir=W
    python -m gl_jax.convert_weights --arch=efficientnet_lite0 --output=weights/lite0
    python -m gl_jax.main --config=configs/image_folder.py:many_classes --config.data.root=DIR \
        --config.model.init_from=weights/lite0 --workdir=W

The first half of the sorted classes train, the rest test (`data.train_classes` changes
the cut). Defaults follow the paper's recipe (BN-Inception, 227 px, 6 x 9 batches, the
CUB hyperparameters) and expect a GPU: about 1 s per step on one modern GPU.

Which recipe for which shape of data (our studies; experiments/README.md):
- hundreds or thousands of classes with a few (4-8) images each, an ImageNet backbone
  fine-tuned end to end: `:many_classes` (EfficientNet-Lite0 at 112 px, AdamW with
  pytorch-metric-learning's learning rates, the prior over the batch's classes, a head
  warm-up on cached features). On 800 kanji x 4 images it lifts the Group Loss's test
  Recall@1 from 20.3 (the default optimiser) to 52.6 ± 2.4, level with multi-similarity
  at the same optimiser (52.0 ± 0.7; experiments/finetune/STUDY.md).
- tens to a hundred classes with 4-9 images each, the network trained from scratch: the
  default Group Loss (experiments/omniglot/STUDY.md: level with the best pair loss on a
  short budget).
- a linear head on frozen features: multi-similarity or triplet (the same study).

`:quick` is CPU-sized: the small CNN at 32 px, 6 epochs of 40 steps, about a minute on
2 cores. On Omniglot's images_background_small1.zip unzipped (its folder as
`--config.data.root`; 68 training and 68 test characters) it lifted held-out Recall@1
from 0.33 (the same network untrained) to 0.56 on this project's 2-core machine.
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
    elif arg == "many_classes":
        many_classes(config)
    elif arg:
        raise ValueError(f"configs/image_folder.py takes no argument, 'quick' or "
                         f"'many_classes', got {arg!r}")
    return config


def many_classes(config):
    """Many classes with a few images each, an ImageNet backbone fine-tuned end to end
    (experiments/finetune/STUDY.md): EfficientNet-Lite0 at 112 px with a 512-d embedding,
    16 x 4 batches, pytorch-metric-learning's optimiser recipe, and the Group Loss's prior
    over the batch's classes."""
    config.model.name = "efficientnet_lite0"
    config.model.embedding_dim = 512
    config.data.image_size, config.data.resize_size = 112, 128
    # ImageNet mean/std, not the (x - 127) / 128 the Lite0 weights were trained with:
    # what the study (and pytorch-metric-learning beside it) measured this recipe with.
    config.data.normalization = "imagenet"
    config.sampler.classes_per_batch, config.sampler.samples_per_class = 16, 4
    # AdamW, backbone 1e-4, the new embedding layer x10, decay 1e-4, a constant lr.
    config.optimizer.name = "adamw"
    config.optimizer.lr = 1e-4
    config.optimizer.head_lr_multiplier = 10.0
    config.optimizer.weight_decay = 1e-4
    config.schedule.lr_drop_epochs = config.schedule.lr_drop_factors = ()
    # With hundreds of classes the softmax over all of them starts nearly uniform: 30
    # warm-up epochs of the head alone on cached backbone features (seconds) teach the
    # classifier first, and over the 16 classes of the batch its logits say more.
    config.warmup.epochs = 30
    config.warmup.freeze_backbone = True
    config.warmup.lr = 1e-3
    config.warmup.eps = 1e-8
    config.warmup.classes_per_batch, config.warmup.samples_per_class = 16, 4
    config.loss.batch_prior = True
    return config
