"""PyTorch eager twins of the gl_jax backbones, for bench_models' side-by-side column only.

``torch_model(name, num_classes, size)`` computes what ``create_model(name,
num_classes=n)`` computes in training mode (backbone, global average pool, Linear(C, n);
NCHW) with the same parameter count. The ResNets are torchvision's; EfficientNet-Lite0,
BN-Inception and the small CNN are built from gl_jax's own block tables. torch is never
a dependency of gl_jax: bench_models runs ``serve`` in a child process of its own.
"""
from __future__ import annotations

import sys
import time
import types

import torch
from torch import nn

from gl_jax.models.bninception import INCEPTION_BLOCKS, block_out_channels
from gl_jax.models.efficientnet_lite import HEAD_CHANNELS, LITE0_STAGES, STEM_CHANNELS


def unit(cin, cout, k, stride=1, padding=0, bias=False, eps=1e-5, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=bias),
                         nn.BatchNorm2d(cout, eps=eps), act())


def same_conv(cin, cout, k, stride, size, groups=1):
    """TF 'SAME' at a known input size: (convolution, output size). An odd total padding
    puts the extra row at the bottom, which Conv2d cannot express, hence the explicit pad."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    low, high = total // 2, total - total // 2
    conv = nn.Conv2d(cin, cout, k, stride, low if low == high else 0, groups=groups, bias=False)
    return (conv if low == high else nn.Sequential(nn.ZeroPad2d((low, high) * 2), conv)), out


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, size):
        super().__init__()
        hidden = cin * expand
        dw, self.size = same_conv(hidden, hidden, k, stride, size, groups=hidden)
        self.body = nn.Sequential(
            *([unit(cin, hidden, 1, eps=1e-3, act=nn.ReLU6)] if expand != 1 else []),
            dw, nn.BatchNorm2d(hidden, eps=1e-3), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=1e-3))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return self.body(x) + x if self.residual else self.body(x)


def lite0(size):
    stem, n = same_conv(3, STEM_CHANNELS, 3, 2, size)
    layers = [stem, nn.BatchNorm2d(STEM_CHANNELS, eps=1e-3), nn.ReLU6()]
    for s in LITE0_STAGES:
        for i in range(s.repeats):
            layers.append(MBConv(s.out_channels if i else s.in_channels, s.out_channels,
                                 s.kernel, 1 if i else s.stride, s.expand_ratio, n))
            n = layers[-1].size
    return layers + [unit(LITE0_STAGES[-1].out_channels, HEAD_CHANNELS, 1, eps=1e-3,
                          act=nn.ReLU6)], HEAD_CHANNELS


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


def torch_model(name: str, num_classes: int, size: int) -> nn.ModuleDict:
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
            "efficientnet_lite0": lambda: lite0(size), "bninception": bninception,
            "small_cnn": lambda: ([unit(3, 32, 3, 1, 1), unit(32, 64, 3, 1, 1),
                                   nn.MaxPool2d(2), unit(64, 64, 3, 1, 1)], 64)}[name]()
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.ModuleDict(dict(body=body, fc=nn.Linear(features, num_classes))).train()


def serve(conn, name: str, num_classes: int, size: int, batch: int, lr: float) -> None:
    """bench_models' child process: sends the twin's parameter count, then for each
    message runs one training step (bench_models' loss, SGD) and sends its seconds,
    until bench_models closes the pipe."""
    model = torch_model(name, num_classes, size)
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
