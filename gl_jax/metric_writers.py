"""Scalar metrics to a JSON-lines file and to TensorBoard event files, without TensorFlow;
and the one Markdown table writer (`markdown_table`) of the trainer, evaluator and
experiments.

TensorBoard reads "event files": a sequence of TFRecords, each holding one serialised
`tensorflow.Event` protocol buffer. Scalars need only a handful of protobuf fields, so we
encode them by hand here instead of depending on TensorFlow or tensorboardX:

        Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
                            Summary summary = 5; }
        Summary { repeated Value value = 1; }
        Value   { string tag = 1; float simple_value = 2; }

TFRecord framing: uint64 length, uint32 masked_crc32c(length), data, uint32
masked_crc32c(data), little-endian.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Mapping, Sequence


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_scalar_event(step: int, scalars: Mapping[str, float], wall_time: float) -> bytes:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) +
                          _field(2, 5, struct.pack("<f", float(value))))
        for tag, value in scalars.items())
    return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step))) +
            _length_delimited(5, values))


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data +
            struct.pack("<I", _masked_crc(data)))


class TensorBoardWriter:
    """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        version = _field(1, 1, struct.pack("<d", time.time())) + _length_delimited(
            3, b"brain.Event:2")
        self._file.write(_record(version))
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._file.write(_record(encode_scalar_event(step, scalars, time.time())))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str):
    """Yields the payload of each TFRecord in `path`, checking both checksums."""
    with open(path, "rb") as f:
        while True:
            header = f.read(8)
            if not header:
                return
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", f.read(4))
            data = f.read(length)
            (data_crc,) = struct.unpack("<I", f.read(4))
            if length_crc != _masked_crc(header) or data_crc != _masked_crc(data):
                raise ValueError(f"{path}: corrupt TFRecord (checksum mismatch)")
            yield data


class MetricWriter:
    """Writes every scalar both to `workdir/metrics.jsonl` and to TensorBoard.

    Only process 0 of a multi-host run should create one (the trainer takes care of it).
    """

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a")
        self._tb = TensorBoardWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        self._tb.write_scalars(step, scalars)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], float_format: str = ".4f"
                   ) -> str:
    """A Markdown table; float cells formatted with `float_format`, others with str()."""
    def cell(v):
        return format(v, float_format) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
