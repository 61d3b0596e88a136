"""The JSON-lines and TensorBoard writers (TensorBoard files written without TensorFlow)."""
import json
import os

import pytest

from gl_jax import metric_writers


def test_crc32c_known_vector():
    # The standard CRC-32C check value of the ASCII digits 1-9.
    assert metric_writers.crc32c(b"123456789") == 0xE3069283


def test_writer_roundtrip(tmp_path):
    writer = metric_writers.MetricWriter(str(tmp_path))
    writer.write(3, {"train/loss": 1.5, "test/recall@1": 0.25})
    writer.write(7, {"train/loss": 0.5})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 7]
    assert rows[0]["train/loss"] == 1.5 and rows[1]["train/loss"] == 0.5
    events = os.listdir(tmp_path / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    records = list(metric_writers.read_records(str(tmp_path / "tensorboard" / events[0])))
    assert len(records) == 3  # the file-version event and two scalar events
    assert b"brain.Event:2" in records[0] and b"train/loss" in records[1]


def test_tensorboard_reads_our_files(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    writer = metric_writers.MetricWriter(str(tmp_path))
    writer.write(3, {"train/loss": 1.5, "test/recall@1": 0.25})
    writer.write(7, {"train/loss": 0.5})
    writer.close()
    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["test/recall@1", "train/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 1.5), (7, 0.5)]


def test_corrupt_record_detected(tmp_path):
    writer = metric_writers.TensorBoardWriter(str(tmp_path))
    writer.write_scalars(1, {"a": 1.0})
    writer.close()
    data = bytearray(open(writer.path, "rb").read())
    data[-6] ^= 0xFF
    open(writer.path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        list(metric_writers.read_records(writer.path))
