"""What the pre-training data scan costs: header scan vs. full decode, by thread count.

Writes --num_files small images (half JPEG, half PNG, --width x --height, smooth
content plus noise so they compress like photos) as an image folder of --num_classes
classes, then times, each --repeats times (best and median printed, the machine may be
shared): listing the folder (image_folder_source), and scan_splits in header and full
mode for each --threads value. The page cache is warm after the writes: these are the
CPU costs of the checks, not of a cold disk or network file system.

    python experiments/bench_scan.py                               # 10,000 64x48 files
    python experiments/bench_scan.py --width=500 --height=375 --num_files=2000   # CUB-sized

(From a git worktree, prefix `PYTHONPATH=.` so that the worktree's gl_jax is measured.)
"""
import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags, logging
from PIL import Image

from gl_jax import data as gdata

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_files", 10_000, "images written")
flags.DEFINE_integer("num_classes", 100, "class folders")
flags.DEFINE_integer("width", 64, "image width")
flags.DEFINE_integer("height", 48, "image height")
flags.DEFINE_list("threads", ["1", "4", "16"], "thread-pool sizes to measure")
flags.DEFINE_integer("repeats", 3, "rounds over all settings")


def write_images(root, num_files, num_classes, width, height, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(num_files):
        c = i % num_classes
        base = np.stack([(x * rng.uniform(1, 4) + y * rng.uniform(1, 4)) % 256] * 3, axis=-1)
        image = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(root, f"class{c:03d}")
        os.makedirs(folder, exist_ok=True)
        extension = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.{extension}"), quality=90)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the scan's one-line summary, once per run
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        write_images(root, FLAGS.num_files, FLAGS.num_classes, FLAGS.width, FLAGS.height)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"wrote {FLAGS.num_files} files ({FLAGS.width}x{FLAGS.height}, half JPEG half PNG, "
              f"{size / FLAGS.num_files / 1024:.1f} KiB each on average) in "
              f"{time.perf_counter() - start:.1f} s; os.cpu_count()={os.cpu_count()}")
        best, median = timed(lambda: gdata.image_folder_source(root), FLAGS.repeats)
        print(f"{'list folder (image_folder_source)':40s} best {best:6.2f} s  median "
              f"{median:6.2f} s")
        splits = {"train": gdata.image_folder_source(root)}
        for full in (False, True):
            for threads in map(int, FLAGS.threads):
                best, median = timed(lambda: gdata.scan_splits(
                    splits, full_decode=full, threads=threads, progress=False), FLAGS.repeats)
                label = f"scan {'full' if full else 'header'}, {threads} thread(s)"
                print(f"{label:40s} best {best:6.2f} s  median {median:6.2f} s  "
                      f"({FLAGS.num_files / best:8.0f} files/s, "
                      f"{best / FLAGS.num_files * 1e6:6.0f} us/file)")


if __name__ == "__main__":
    app.run(main)
