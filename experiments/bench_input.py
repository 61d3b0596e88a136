"""Input pipeline throughput: grain (0, 1, 2 workers) vs. a plain Python loop with PIL.

Both decode JPEGs, apply the training transform (random resized crop to --image_size
+ horizontal flip), stack into P x K batches and normalise (caffe_bgr). Images per
second are measured after one warm-up batch (which includes worker start-up); the
settings are measured in turn, --repeats times, and the best and the median of the
repeats are printed (the machine is shared: the best is the least disturbed run).

    python experiments/bench_input.py                  # CPU-sized: ~1-2 minutes
    python experiments/bench_input.py --num_classes=100 --images_per_class=60 \
        --steps=50 --workers=0,1,2,4,8                  # CUB-sized

The generated JPEGs are 500 x 375 (CUB's typical size), written to a temporary folder.
"""
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from gl_jax import data as gdata
from gl_jax.data.transforms import normalize, random_resized_crop_box

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_classes", 12, "classes of generated JPEGs")
flags.DEFINE_integer("images_per_class", 18, "JPEGs per class")
flags.DEFINE_integer("image_size", 227, "crop size")
flags.DEFINE_integer("classes_per_batch", 6, "P")
flags.DEFINE_integer("samples_per_class", 9, "K")
flags.DEFINE_integer("steps", 8, "timed batches per setting (after one warm-up batch)")
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure")
flags.DEFINE_integer("read_threads", 1, "grain read threads per process")
flags.DEFINE_integer("repeats", 3, "rounds over all settings")


def write_jpegs(root, num_classes, per_class, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, f"{c:03d}")
        os.makedirs(folder)
        for i in range(per_class):
            # smooth random image: compresses like a photo rather than like noise.
            small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((500, 375), Image.BILINEAR)
            image.save(os.path.join(folder, f"{i:04d}.jpg"), quality=90)


def plain_loop(source, batches, image_size, seed):
    """The same work written the obvious way: PIL decode, crop, resize, flip, stack."""
    for step, batch in enumerate(batches):
        images = []
        for slot, index in enumerate(batch):
            rng = np.random.default_rng([seed, step, slot])
            with Image.open(source.paths[index]) as img:
                img = img.convert("RGB")
                top, left, h, w = random_resized_crop_box(img.height, img.width, rng)
                img = img.crop((left, top, left + w, top + h))
                img = img.resize((image_size, image_size), Image.BILINEAR)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                images.append(np.asarray(img))
        yield normalize(np.stack(images), "caffe_bgr")


def timed(iterator, steps):
    next(iterator)  # warm-up: worker start-up, first epoch's sampler
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return time.perf_counter() - start


def main(argv):
    del argv
    batch = FLAGS.classes_per_batch * FLAGS.samples_per_class
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, FLAGS.num_classes, FLAGS.images_per_class)
        source = gdata.image_folder_source(root)
        data_config = gdata.default_config("image_folder")
        data_config.update(image_size=FLAGS.image_size, read_threads=FLAGS.read_threads)
        sampler_config = gdata.default_sampler_config("image_folder")
        sampler_config.update(classes_per_batch=FLAGS.classes_per_batch,
                              samples_per_class=FLAGS.samples_per_class)
        sampler = gdata.make_sampler(source, sampler_config)
        batches = np.concatenate([sampler.batches(e) for e in range(
            FLAGS.steps // sampler.num_batches() + 2)])
        # the two do the same work: equal first batches, pixel for pixel.
        data_config.worker_count = 0
        check = gdata.make_train_iterator(source, data_config, sampler_config)
        np.testing.assert_array_equal(next(check)["image"],
                                      next(plain_loop(source, batches, FLAGS.image_size, 0)))
        check.close()
        names = ["plain PIL loop"] + [f"grain, {w} workers" for w in FLAGS.workers]
        seconds = {name: [] for name in names}
        for _ in range(FLAGS.repeats):
            seconds[names[0]].append(timed(plain_loop(source, batches, FLAGS.image_size, 0),
                                           FLAGS.steps))
            for name, workers in zip(names[1:], map(int, FLAGS.workers)):
                data_config.worker_count = workers
                it = gdata.make_train_iterator(source, data_config, sampler_config)
                try:
                    seconds[name].append(timed(it, FLAGS.steps))
                finally:
                    if hasattr(it, "close"):
                        it.close()
    images = FLAGS.steps * batch
    print(f"\n{images} images per run ({FLAGS.steps} batches of {FLAGS.classes_per_batch} x "
          f"{FLAGS.samples_per_class}), 500x375 JPEG -> {FLAGS.image_size} px, "
          f"{os.cpu_count()} CPUs, best and median of {FLAGS.repeats} runs")
    print(f"| {'pipeline':<22} | best images/s | vs plain loop | median images/s |"
          " vs plain loop |")
    print(f"|{'-' * 24}|---------------|---------------|-----------------|---------------|")
    base_best, base_median = min(seconds[names[0]]), np.median(seconds[names[0]])
    for name in names:
        best, median = min(seconds[name]), np.median(seconds[name])
        print(f"| {name:<22} | {images / best:13.1f} | {base_best / best:12.2f}x "
              f"| {images / median:15.1f} | {base_median / median:12.2f}x |")


if __name__ == "__main__":
    app.run(main)
