"""PyTorch twins of every gl_jax backbone, for side-by-side speed benchmarks only.

torch (and torchvision for the ResNets) are never dependencies of gl_jax: this module
imports them only inside its functions, which bench_models calls in a child process (see
the end of this docstring). Each twin computes
the same function as ``gl_jax.models.create_model(name, num_classes=n)`` in training mode
(backbone -> global average pool -> Linear(C, n)), in PyTorch's NCHW layout, with the
same parameter count (``torch_model`` checks it):

- resnet18/34/50/101: ``torchvision.models.resnetXX(weights=None)`` with a new ``fc``.
- efficientnet_lite0: built here from gl_jax's stage table (TF 'SAME' padding through a
  static zero pad before the strided convolutions, as efficientnet_pytorch does).
- bninception: built here from gl_jax's Caffe-port block table.
- small_cnn: the three 3x3 convolutions.

The ``import torchvision`` workaround of stack-notes (its compiled ops may not match
this torch; the models do not need them) is applied by ``import_torch``.

Run as a script, this module serves one twin's training step to bench_models over a pipe
(``serve``), so that PyTorch runs in a process of its own.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time
import types


def import_torch(need_torchvision: bool = False):
    """(torch, torchvision or None); raises ImportError when they are not importable."""
    import torch  # noqa: F401
    torchvision = None
    if need_torchvision:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("m"))
        import torchvision
    return torch, torchvision


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def build_efficientnet_lite0(num_classes: int, size: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    from gl_jax.models.efficientnet_lite import HEAD_CHANNELS, LITE0_STAGES, STEM_CHANNELS

    class SameConv(nn.Conv2d):
        """TF 'SAME' for a fixed input size: symmetric padding when it is, else a pad."""

        def __init__(self, cin, cout, k, stride, size, groups=1):
            low, high = _same_pads(size, k, stride)
            sym = low == high
            super().__init__(cin, cout, k, stride, padding=low if sym else 0, groups=groups,
                             bias=False)
            self.extra = None if sym else (low, high, low, high)
            self.out_size = -(-size // stride)

        def forward(self, x):
            return super().forward(F.pad(x, self.extra) if self.extra else x)

    class Block(nn.Module):
        def __init__(self, cin, cout, k, stride, expand, size):
            super().__init__()
            hidden = cin * expand
            self.expand = None
            if expand != 1:
                self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False),
                                            nn.BatchNorm2d(hidden, eps=1e-3), nn.ReLU6())
            self.dw = SameConv(hidden, hidden, k, stride, size, groups=hidden)
            self.out_size = self.dw.out_size
            self.bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
            self.project = nn.Conv2d(hidden, cout, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout, eps=1e-3)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            h = self.expand(x) if self.expand is not None else x
            h = F.relu6(self.bn1(self.dw(h)))
            y = self.bn2(self.project(h))
            return y + x if self.residual else y

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = SameConv(3, STEM_CHANNELS, 3, 2, size)
            n = self.stem.out_size
            self.bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=1e-3)
            blocks = []
            for stage in LITE0_STAGES:
                for index in range(stage.repeats):
                    first = index == 0
                    block = Block(stage.in_channels if first else stage.out_channels,
                                  stage.out_channels, stage.kernel,
                                  stage.stride if first else 1, stage.expand_ratio, n)
                    n = block.out_size
                    blocks.append(block)
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Conv2d(LITE0_STAGES[-1].out_channels, HEAD_CHANNELS, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=1e-3)
            self.fc = nn.Linear(HEAD_CHANNELS, num_classes)

        def forward(self, x):
            x = F.relu6(self.bn0(self.stem(x)))
            x = self.blocks(x)
            x = F.relu6(self.bn1(self.head(x)))
            pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return pooled, self.fc(pooled)

    return Lite0()


def build_bninception(num_classes: int):
    import torch
    from torch import nn
    from torch.nn import functional as F

    from gl_jax.models.bninception import INCEPTION_BLOCKS, block_out_channels

    def unit(cin, cout, k, stride=1, padding=0):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=True),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class Inception(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.spec = spec
            self.b1 = unit(spec.in_channels, spec.n1x1, 1) if spec.n1x1 else None
            self.b3 = nn.Sequential(unit(spec.in_channels, spec.n3x3_reduce, 1),
                                    unit(spec.n3x3_reduce, spec.n3x3, 3, spec.stride, 1))
            self.bd = nn.Sequential(unit(spec.in_channels, spec.double_reduce, 1),
                                    unit(spec.double_reduce, spec.double_3x3, 3, 1, 1),
                                    unit(spec.double_3x3, spec.double_3x3, 3, spec.stride, 1))
            self.proj = unit(spec.in_channels, spec.pool_proj, 1) if spec.pool_proj else None

        def forward(self, x):
            s = self.spec
            out = [self.b1(x)] if self.b1 is not None else []
            out += [self.b3(x), self.bd(x)]
            if s.stride == 2:
                p = F.max_pool2d(x, 3, 2, ceil_mode=True)
            elif s.pool == "max":
                p = F.max_pool2d(x, 3, 1, 1, ceil_mode=True)
            else:
                p = F.avg_pool2d(x, 3, 1, 1, count_include_pad=True)
            out.append(self.proj(p) if self.proj is not None else p)
            return torch.cat(out, 1)

    class BNInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = unit(3, 64, 7, 2, 3)
            self.conv2r = unit(64, 64, 1)
            self.conv2 = unit(64, 192, 3, 1, 1)
            self.blocks = nn.Sequential(*[Inception(s) for s in INCEPTION_BLOCKS])
            self.fc = nn.Linear(block_out_channels(INCEPTION_BLOCKS[-1]), num_classes)

        def forward(self, x):
            x = F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True)
            x = F.max_pool2d(self.conv2(self.conv2r(x)), 3, 2, ceil_mode=True)
            x = self.blocks(x)
            pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return pooled, self.fc(pooled)

    return BNInception()


def build_small_cnn(num_classes: int, width: int = 32):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
            self.c3 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.ReLU())
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x):
            x = self.c3(F.max_pool2d(self.c2(self.c1(x)), 2, 2))
            pooled = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
            return pooled, self.fc(pooled)

    return SmallCNN()


def torch_model(name: str, num_classes: int, size: int, expected_params: int | None = None):
    """The PyTorch twin of ``name`` in training mode: ``pooled, logits = model(x_nchw)``."""
    if name.startswith("resnet"):
        torch, torchvision = import_torch(need_torchvision=True)
        base = getattr(torchvision.models, name)(weights=None)
        base.fc = torch.nn.Linear(base.fc.in_features, num_classes)

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = base

            def forward(self, x):
                n = self.net
                x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
                x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
                pooled = torch.flatten(n.avgpool(x), 1)
                return pooled, n.fc(pooled)

        model = Wrapped()
    else:
        import_torch()
        builders = {"efficientnet_lite0": lambda: build_efficientnet_lite0(num_classes, size),
                    "bninception": lambda: build_bninception(num_classes),
                    "small_cnn": lambda: build_small_cnn(num_classes)}
        if name not in builders:
            raise KeyError(f"no PyTorch twin for {name!r}")
        model = builders[name]()
    count = sum(p.numel() for p in model.parameters())
    if expected_params is not None and count != expected_params:
        raise AssertionError(f"torch {name}: {count} parameters, gl_jax has {expected_params}")
    return model.train()


def make_torch_step(name: str, num_classes: int, size: int, batch: int,
                    expected_params: int | None = None, lr: float = 0.01):
    """A zero-argument function running one eager training step of the twin on random
    images: forward, the benchmark's loss (mean(pooled^2) + mean(logits^2)), backward,
    SGD. PyTorch's CPU kernels return when done, so the caller can time the call."""
    import torch

    model = torch_model(name, num_classes, size, expected_params)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    images = torch.randn(batch, 3, size, size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        pooled, logits = model(images)
        loss = pooled.pow(2).mean() + logits.pow(2).mean()
        loss.backward()
        optimizer.step()

    return step


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> bool:
    """Keep freed memory in this process's heap (glibc malloc): no mmap for large blocks,
    no trimming. Returns whether it took effect (False off glibc).

    By default glibc serves large blocks with mmap and unmaps them on free, with an
    adaptive threshold that moves with the process's history; PyTorch eager allocates and
    frees its activations every step, so it then pays a page fault per fresh page, and its
    step time depended on what had run before in the process: the small CNN's at 112 px
    took 730-910 ms in fresh processes and about 350 ms with this setting, ResNet-18's
    340-360 ms and 330 ms, Lite0's 420-460 ms and 350-360 ms. XLA keeps its own buffers and
    did not move (2 December, 2 cores). Set once per process, before it times a step.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
                    and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def serve(commands, replies) -> None:
    """One twin's training step, driven over a pipe (bench_models' ``TorchTwin``).

    The first line of ``commands`` is a JSON object of ``make_torch_step``'s arguments;
    the reply is ``{"ready": true}``, or ``{"missing": message}`` when torch or
    torchvision is not importable (then this returns). Each later line ``step`` runs one
    step and replies its seconds; the end of ``commands`` ends the loop. Any other failure
    propagates (the script prints it to stderr and exits 1)."""
    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    spec = json.loads(commands.readline())
    try:
        step = make_torch_step(**spec)
    except ImportError as e:
        reply({"missing": f"{type(e).__name__}: {e}"})
        return
    reply({"ready": True})
    for line in commands:
        if line.strip() != "step":
            raise ValueError(f"unknown command {line.strip()!r} (expected 'step')")
        start = time.perf_counter()
        step()
        reply({"seconds": time.perf_counter() - start})


if __name__ == "__main__":
    # Replies go to a private copy of stdout; anything the libraries print goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    steady_allocator()
    serve(sys.stdin, replies)    # a failure prints its traceback to stderr and exits 1
