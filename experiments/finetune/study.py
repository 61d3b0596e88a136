"""The Group Loss where classes are many and images per class few, fine-tuned end to end:
its levers and multi-similarity at pytorch-metric-learning's recipe, same data, backbone,
batches and steps; pytorch-metric-learning itself beside them (pml_baseline.py).

    python experiments/kanji/make_kanji.py --fonts=4 --out=~/.cache/gl_jax/kanji4
    python -m gl_jax.sweep --config=experiments/finetune/study.py
    python -m gl_jax.sweep --config=experiments/finetune/study.py --test
    python experiments/finetune/pml_baseline.py --config=experiments/finetune/study.py \
        --root=~/.cache/gl_jax/kanji4 --loss=multi_similarity --seed=S --output=ms_S.json

Data: 2,000 kanji drawn by 4 Japanese typefaces (experiments/kanji/make_kanji.py), one
class per character, 4 images each: the first 1,000 sorted characters train (their last
`VAL` validate, class-disjoint), the other 1,000 are the unseen test classes. Model:
ImageNet EfficientNet-Lite0 (`gl_jax.weights`), every layer trained, 112 px (resize
128; gl_jax's train transform: random resized crop and flip; ImageNet mean/std
normalisation for both libraries), a 512-d embedding layer, 16 x 4 batches, `EPOCHS`
passes over the 800 training characters (300 steps) at a constant learning rate.

The first look (seed 0) compares, on validation characters only, the library's Group
Loss, the PML recipe with every lever, the PML recipe alone and multi-similarity; the
first final rows (that choice and multi-similarity, 3 seeds) were fixed from it. The
ablations (one lever at a time, validation) then chose a second row (the batch prior),
and a look around it a third (batch prior + head warm-up, `image_folder.py:many_classes`).
Every final row is tested once at its end (`--test` for the seed-0 runs of the looks).
Written up in STUDY.md.
"""
import os

from configs import image_folder

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gl_jax")
ROOT = os.path.join(CACHE, "kanji4")
VAL = 200            # validation characters, carved from the training half
EPOCHS = 6
SEEDS = (0, 1, 2)

# pytorch-metric-learning's examples: AdamW, backbone 1e-4, the new embedding layer
# 1e-3, proxies 1e-2, weight decay 1e-4.
PML_RECIPE = {"optimizer.name": "adamw", "optimizer.lr": 1e-4,
              "optimizer.head_lr_multiplier": 10.0, "optimizer.weight_decay": 1e-4}
# The library's Group Loss as `configs/image_folder.py` sets it (RAdam lr 1.56e-4), no
# warm-up: where the issue started.
LIBRARY = {"loss.name": "group_loss"}
# Levers on the Group Loss's prior, each added to the PML recipe, and all of them at once.
GROUP_PML = dict(LIBRARY, **PML_RECIPE)
FAST_CLASSIFIER = {"optimizer.classifier_lr_multiplier": 100.0}
BATCH_PRIOR = {"loss.batch_prior": True}
# 30 epochs of the embedding layer and classifier alone on cached backbone features
# (seconds), so that the first group step has a prior that knows the training classes.
HEAD_WARMUP = {"warmup.epochs": 30, "warmup.freeze_backbone": True, "warmup.lr": 1e-3,
               "warmup.eps": 1e-8}
ALL_LEVERS = dict(FAST_CLASSIFIER, **BATCH_PRIOR, **HEAD_WARMUP)
MULTI_SIMILARITY = {"loss.name": "multi_similarity", **PML_RECIPE,
                    # PML's MultiSimilarityLoss without its miner: every pair.
                    "loss.multi_similarity.mining_margin": 10.0}
# The first look (seed 0, validation only): where the issue started, the PML recipe with
# every lever, the PML recipe alone, and multi-similarity at PML's recipe.
FIRST_LOOK = [LIBRARY, dict(GROUP_PML, **ALL_LEVERS), GROUP_PML, MULTI_SIMILARITY]
# Fixed from the first look's validation table (STUDY.md): every lever.
FIRST_CHOICE = dict(GROUP_PML, **ALL_LEVERS)
# Ablations run after the first look's final rows were fixed (validation only): the two
# prior levers one at a time on the PML recipe.
ABLATIONS = [dict(GROUP_PML, **lever) for lever in (BATCH_PRIOR, HEAD_WARMUP)]
# Chosen from the ablations' validation numbers (the batch prior alone beat every lever
# together): a second final row.
SECOND_CHOICE = dict(GROUP_PML, **BATCH_PRIOR)
# A look around it (validation only): the head warm-up added (each lever alone had
# helped; all of them with the x100 classifier lr less), and a sharper prior.
AROUND_SECOND = [dict(SECOND_CHOICE, **change) for change in (HEAD_WARMUP,
                                                              {"loss.temperature": 3.0})]
# Chosen from that look: the third final row and `configs/image_folder.py:many_classes`.
CHOSEN = dict(SECOND_CHOICE, **HEAD_WARMUP)
# The final rows, tested once at their end: the three Group Loss choices and
# multi-similarity with every seed; the library's Group Loss and the PML recipe alone
# with seed 0.
FINAL = [(FIRST_CHOICE, SEEDS), (MULTI_SIMILARITY, SEEDS), (SECOND_CHOICE, SEEDS),
         (CHOSEN, SEEDS), (LIBRARY, (0,)), (GROUP_PML, (0,))]


def get_config(arg=None):
    config = image_folder.get_config()
    from gl_jax import weights
    config.data.root = ROOT
    config.data.val_classes = VAL
    config.data.image_size, config.data.resize_size = 112, 128
    config.data.normalization = "imagenet"
    config.data.augment = True
    config.model.name = "efficientnet_lite0"
    config.model.init_from = weights.converted_efficientnet_lite0(
        os.path.join(CACHE, "experiments", "lite0"))
    config.model.embedding_dim = 512
    config.model.features_dir = os.path.join(CACHE, "features")
    config.sampler.classes_per_batch, config.sampler.samples_per_class = 16, 4
    config.warmup.epochs = 0
    config.warmup.classes_per_batch, config.warmup.samples_per_class = 16, 4
    config.schedule.epochs = EPOCHS
    config.schedule.lr_drop_epochs = config.schedule.lr_drop_factors = ()
    config.selection.protocol = "validation"
    config.evals.every_epochs = EPOCHS       # one validation evaluation, at the end
    config.evals.final_test = False
    config.evals.untrained_baseline = False
    config.evals.nmi = False
    config.checkpoint.every_steps = 100
    config.logging.progress = False
    config.mesh.num_devices = 1
    if arg not in (None, "explore"):
        raise ValueError(f"study.py takes no argument or 'explore', got {arg!r}")
    return config


def _first_look() -> list[dict]:
    return [dict(p, seed=0) for p in FIRST_LOOK]


def _final() -> list[dict]:
    return [dict(row, seed=s, **{"evals.final_test": True}) for row, seeds in FINAL
            for s in seeds]


def _strip(point: dict) -> dict:
    return {k: v for k, v in point.items() if k != "evals.final_test"}


def sweep(arg=None):
    """`:explore`: the first look; no argument: every run, in the order they ran (the first
    look, the first choice's and multi-similarity's other seeds, the ablations, the second
    choice's other seeds, the look around it, the chosen recipe's other seeds)."""
    first = _first_look()
    if arg == "explore":
        return first
    ablations = [dict(p, seed=0) for p in ABLATIONS]
    around = [dict(p, seed=0) for p in AROUND_SECOND]
    final = [p for p in _final() if _strip(p) not in first + ablations + around]
    return first + final[:4] + ablations + final[4:6] + around + final[6:]


def test_points(arg=None):
    """The final rows whose seed-0 run an earlier look trained get their one test pass."""
    if arg == "explore":
        return []
    looked = _first_look() + [dict(p, seed=0) for p in ABLATIONS + AROUND_SECOND]
    return [p for p in looked if dict(p, **{"evals.final_test": True}) in _final()]


def label(point: dict) -> str:
    """'Group Loss, PML recipe + batch prior + head warm-up' from a point's overrides."""
    if point.get("loss.name") == "multi_similarity":
        return "multi-similarity, PML recipe, no miner"
    if "optimizer.name" not in point:
        return "Group Loss, library defaults (RAdam lr 1.56e-4)"
    parts = ["Group Loss, PML recipe"]
    if point.get("optimizer.classifier_lr_multiplier", 1.0) != 1.0:
        parts.append(f"classifier lr x{point['optimizer.classifier_lr_multiplier']:g}")
    if point.get("loss.batch_prior"):
        parts.append("batch prior")
    if point.get("warmup.freeze_backbone"):
        parts.append(f"{point['warmup.epochs']}-epoch head warm-up")
    if "loss.temperature" in point:
        parts.append(f"T {point['loss.temperature']:g}")
    return " + ".join(parts)
