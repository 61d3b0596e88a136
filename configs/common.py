"""Fields every config shares; each dataset file overrides what differs.

Sections: `data`, `sampler` (from gl_jax.data), `model`, `loss`, `optimizer`, `schedule`,
`warmup` (the classification fine-tuning stage), `selection`, `evals`, `mesh`,
`checkpoint`, `logging`, `cpu`. Every field can be overridden on the command line, e.g.
`--config.optimizer.lr=1e-4`.
"""
from __future__ import annotations

import ml_collections

from gl_jax import data
from gl_jax.losses import registry as loss_registry


def get_config(dataset: str = "digits") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data.default_config(dataset)
    config.sampler = data.default_sampler_config(dataset)

    config.model = ml_collections.ConfigDict()
    config.model.name = "bninception"   # see gl_jax.models.available_models()
    config.model.embedding_dim = 0      # 0 = the pooled backbone feature (the paper)
    config.model.pooling = "avg"        # 'avg' | 'max' | 'mix' (Group Loss++)
    config.model.pool_mix = 0.5
    config.model.leak = -1.0            # < 0 = plain ReLU; Group Loss++ leak slope otherwise
    config.model.bn_momentum = -1.0     # < 0 = the backbone's default (Flax convention)
    config.model.bn_epsilon = -1.0      # < 0 = the backbone's default
    config.model.dtype = "float32"      # 'bfloat16' on accelerators; parameters stay float32
    # 'auto' | 'on' | 'off': the CPU forms of a few layers (gl_jax/models/cpu_kernels.py,
    # the same function, faster on XLA:CPU); auto = on when JAX's backend is the CPU.
    config.model.cpu_kernels = "auto"
    config.model.init_from = ""         # an Orbax checkpoint from gl_jax.convert_weights
    # Head-only training: the backbone's parameters and BatchNorm statistics stay fixed,
    # only the embedding layer and the classifier train. Its features of every split are
    # computed once (cache_features): evaluation runs only the head, and without
    # augmentation an epoch costs a matrix multiply. features_dir: keep them on disk for
    # later runs with the same backbone and data (sweeps of head or loss settings).
    config.model.freeze_backbone = False
    config.model.cache_features = True
    config.model.features_dir = ""

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "group_loss"
    # Defaults chosen on validation characters by experiments/omniglot/study.py (3
    # replicator iterations, auxiliary CE weight 0.3; the paper: 1 and 1.0, which the
    # configs reproducing its numbers keep, see paper_group_loss).
    config.loss.temperature = 24.0
    config.loss.num_iterations = 3
    config.loss.anchors_per_class = 2
    config.loss.random_anchors = False  # False: first k of each class, as the original
    # True: the prior is a softmax over the batch's classes only (not the paper's; for
    # many classes with few images each, where the softmax over all is nearly uniform).
    config.loss.batch_prior = False
    config.loss.ce_weight = 0.3         # total = group loss + ce_weight * cross-entropy
    # The baselines (loss.name = 'triplet', 'contrastive', 'multi_similarity',
    # 'proxy_anchor', 'normalized_softmax') read their hyperparameters from
    # config.loss.<name>, e.g. --config.loss.name=triplet --config.loss.triplet.margin=0.1;
    # each has its own ce_weight (0 by default). See gl_jax/losses/registry.py.
    for name in loss_registry.available_losses():
        if name != "group_loss":
            config.loss[name] = ml_collections.ConfigDict(loss_registry.default_hparams(name))

    # RAdam with decoupled weight decay (p <- p - lr * wd * p), as the official code;
    # 'adamw' is torch's AdamW (the recipe of pytorch-metric-learning's examples).
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "radam"
    config.optimizer.lr = 2e-4
    config.optimizer.weight_decay = 0.0
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    # Scales the classifier's steps (the proxies of proxy_anchor / normalized_softmax) in
    # the metric-loss stage; Proxy-Anchor's paper trains its proxies with 100 x the lr.
    config.optimizer.classifier_lr_multiplier = 1.0
    # Scales the embedding layer's steps (a new layer on a pretrained backbone: the
    # fine-tuning recipes of the field give it 10 x the backbone's lr).
    config.optimizer.head_lr_multiplier = 1.0

    config.schedule = ml_collections.ConfigDict()
    config.schedule.epochs = 70   # 0: the warm-up stage alone (a classification baseline)
    # 1-based epochs at whose start lr becomes lr * factor (factors relative to the
    # initial lr: the original sets lr / 10 at both 31 and 51) and, with
    # reload_best_at_drop, the best checkpoint so far is reloaded first.
    config.schedule.lr_drop_epochs = (31, 51)
    config.schedule.lr_drop_factors = (0.1, 0.1)
    config.schedule.reload_best_at_drop = True
    config.schedule.steps_per_epoch = 0  # 0 = the sampler's epoch; > 0 caps it (quick runs)

    # Stage 1: classification fine-tuning on the training classes (plain cross-entropy,
    # eval-style transform, no weight decay), as the official code. epochs = 0 skips it.
    config.warmup = ml_collections.ConfigDict()
    config.warmup.epochs = 10
    config.warmup.lr = 3e-4
    config.warmup.eps = 1e-2   # RAdam's betas: those of config.optimizer
    config.warmup.classes_per_batch = 8  # 8 x 4 = the reference's batch of 32
    config.warmup.samples_per_class = 4
    config.warmup.steps_per_epoch = 0
    # True: the warm-up trains only the embedding layer and classifier, on the backbone's
    # cached features (model.cache_features); the group stage then trains every layer.
    config.warmup.freeze_backbone = False

    # 'paper': best test Recall@1 per epoch (selects on the test set, as the original);
    # 'validation': best Recall@1 on the class-disjoint 'val' split (needs
    # data.val_classes > 0), the test split evaluated once at the end.
    config.selection = ml_collections.ConfigDict()
    config.selection.protocol = "paper"
    config.selection.metric = "recall@1"

    config.evals = ml_collections.ConfigDict()
    config.evals.every_epochs = 1
    config.evals.batch_size = 128
    config.evals.ks = (1, 2, 4, 8)
    config.evals.nmi = True
    config.evals.map_at_r = True
    # Evaluate the network before any training too: results.json and the final table
    # then show the gain. One extra pass over the test split (not with final_test False).
    config.evals.untrained_baseline = True
    # False: no test evaluation at the end (results.json says so). For hyperparameter
    # searches on the validation split: the same command with True later evaluates the
    # finished run's selected model on the test split, once.
    config.evals.final_test = True

    # Process settings the command line makes before JAX starts (gl_jax/xla_flags.py).
    config.cpu = ml_collections.ConfigDict()
    # XLA:CPU's Eigen convolutions instead of YNNPACK: set only on a CPU-only host with a
    # jaxlib where it was measured (0.10); configs/omniglot.py turns it on.
    config.cpu.eigen_convolutions = False

    config.mesh = ml_collections.ConfigDict()
    config.mesh.num_devices = -1        # -1 = every device of every host
    config.mesh.shard_params = False    # True: parameters and optimizer state sharded too
    config.mesh.distributed = False     # True: jax.distributed.initialize() (multi-host)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 200
    config.checkpoint.max_to_keep = 3
    # After SIGTERM the run saves within two steps; if it cannot (a step or a data read
    # that never returns) it exits without saving after this many seconds.
    config.checkpoint.preemption_timeout_s = 25.0

    config.logging = ml_collections.ConfigDict()
    config.logging.every_steps = 20
    config.logging.progress = True
    return config


def paper_group_loss(config) -> None:
    """The Group Loss paper's objective (1 replicator iteration, auxiliary cross-entropy
    weight 1) for the configs that reproduce its published numbers."""
    config.loss.num_iterations = 1
    config.loss.ce_weight = 1.0


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a dataset config to a CPU-sized run (`:quick`): small backbone and images,
    a few short epochs. Numbers from such a run only show that the pipeline works."""
    config.model.name = "resnet18"
    config.data.image_size = 32
    config.data.resize_size = 36
    config.data.normalization = "imagenet"
    config.schedule.epochs = 2
    config.schedule.steps_per_epoch = 5
    config.schedule.lr_drop_epochs = (2,)
    config.schedule.lr_drop_factors = (0.1,)
    config.warmup.epochs = 1
    config.warmup.steps_per_epoch = 5
    config.evals.batch_size = 64
    config.evals.nmi = False
    config.checkpoint.every_steps = 5
    return config


def reid_config(dataset: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The shared re-id recipe (Market-1501, DukeMTMC-reID): ResNet-50 at 224 px with
    ImageNet normalisation, 8 identities x 4 images, CMC rank@1 for model selection. The
    Group Loss papers give no re-id recipe: these are the CUB values, not tuned."""
    config = get_config(dataset)
    config.model.name = "resnet50"
    config.data.normalization = "imagenet"
    config.data.image_size = 224
    config.data.resize_size = 256
    config.sampler.classes_per_batch = 8
    config.sampler.samples_per_class = 4
    config.loss.temperature = 24.0
    config.loss.anchors_per_class = 1
    paper_group_loss(config)
    config.optimizer.lr = 1.5637e-4
    config.optimizer.weight_decay = 6.06e-6
    config.evals.ks = (1, 5, 10)
    config.evals.nmi = False
    config.selection.metric = "rank@1"
    if arg == "quick":
        quick(config)
        config.evals.ks = (1, 5)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use 'quick' or nothing")
    return config
