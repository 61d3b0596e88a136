"""experiments/bench_trainer.py: the bare steps run the trainer's step on its batches."""
import argparse

import pytest

from experiments import bench_trainer
from gl_jax import train


@pytest.mark.slow   # a benchmark script's test: compiles a training step
def test_the_bare_step_trains_on_the_trainers_uint8_batches(monkeypatch):
    seen = []
    step = train.train_step

    def recording(graphdef, tx, spec, state, batch, **kwargs):
        seen.append((batch["image"].dtype.name, kwargs.get("normalization"), spec.name))
        return step(graphdef, tx, spec, state, batch, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    args = argparse.Namespace(model="small_cnn", size=32, steps=2, dtype="float32")
    seconds = bench_trainer.bare_steps(args, lite0="")
    assert list(seconds) == [bench_trainer.GROUP_LOSS, bench_trainer.CE_ONLY]
    assert all(s > 0 for s in seconds.values())
    # traced once each, on the uint8 batch, with the omniglot config's normalisation; the
    # Group Loss stage's step, then the one with the cross-entropy alone
    assert [s[:2] for s in seen] == [("uint8", "unit")] * 2
    assert [s[2] for s in seen] == ["group_loss", None]
