"""Read PyTorch checkpoint files without torch and without trusting them.

`torch.save` writes a pickle. Unpickling runs whatever callables the file names, so a
malicious ``.pth`` can execute code on load. This reader unpickles with a closed list
of globals: the tensor/parameter rebuild functions, the storage classes and dtypes,
and ``collections.OrderedDict``. Each is mapped to a NumPy-building function of ours;
any other global (``os.system``, ``builtins.exec``, ``numpy...``, a model class) stops
the load with an :class:`UnsafeCheckpointError` that names the global and the file
before anything is called.

Two on-disk layouts are understood:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` holds the object pickle, whose
  persistent ids ``('storage', storage_type, key, location, numel)`` point at raw
  little- or big-endian storages ``<prefix>/data/<key>``; ``<prefix>/byteorder`` says
  which (absent means little).
* the legacy format: pickles in sequence (magic number, protocol version, system
  info, the object pickle whose persistent ids are
  ``('storage', storage_type, key, location, numel, view_metadata)``, the list of
  storage keys), then for each key in that list its element count as an int64
  followed by the raw bytes.

A tensor is rebuilt as ``numpy.lib.stride_tricks.as_strided`` over its storage
starting at ``storage_offset`` with the saved ``size`` and ``stride`` (in elements),
bounds-checked against the storage length, and copied into a contiguous array.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["UnsafeCheckpointError", "read_torch_file", "load_state_dict"]

# First pickle of a legacy torch file.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


# Limits on what a zip entry may inflate to, checked on the size its header declares
# before anything is inflated, and again on the bytes actually read (a header can lie).
# The object pickle holds names, shapes and strides, not tensor data: a few MB for the
# largest state dicts.
MAX_PICKLE_BYTES = 64 << 20
_MAX_SMALL_RECORD_BYTES = 64       # the "byteorder" record: "little" or "big"
# torch.save stores its entries uncompressed; a file re-zipped with deflate shrinks by a
# few percent, as trained weights are close to random bits. A storage that inflates more
# than this many times its compressed size (and past _RATIO_FLOOR bytes) is a zip bomb.
MAX_COMPRESSION_RATIO = 100
_RATIO_FLOOR = 1 << 20
# Stored and deflated entries can be inflated in bounded steps; zipfile hands bzip2 and
# lzma data to a decompressor with no output bound, so a small read can inflate hugely.
_BOUNDED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file's pickle names a global outside the allowed tensor-building set."""


def _bfloat16() -> np.dtype:
    import ml_dtypes  # comes with jax; imported lazily because few files need it

    return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype factory (a factory so bfloat16 stays lazy).
_STORAGE_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "FloatStorage": lambda: np.dtype(np.float32),
    "DoubleStorage": lambda: np.dtype(np.float64),
    "HalfStorage": lambda: np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": lambda: np.dtype(np.int64),
    "IntStorage": lambda: np.dtype(np.int32),
    "ShortStorage": lambda: np.dtype(np.int16),
    "CharStorage": lambda: np.dtype(np.int8),
    "ByteStorage": lambda: np.dtype(np.uint8),
    "BoolStorage": lambda: np.dtype(np.bool_),
    # torch.UntypedStorage is saved as bytes; a tensor over it carries its own dtype.
    "UntypedStorage": lambda: np.dtype(np.uint8),
}

# torch dtype globals (``torch.float32``...) as used by _rebuild_tensor_v3.
_TORCH_DTYPES: dict[str, Callable[[], np.dtype]] = {
    "float32": _STORAGE_DTYPES["FloatStorage"],
    "float": _STORAGE_DTYPES["FloatStorage"],
    "float64": _STORAGE_DTYPES["DoubleStorage"],
    "double": _STORAGE_DTYPES["DoubleStorage"],
    "float16": _STORAGE_DTYPES["HalfStorage"],
    "half": _STORAGE_DTYPES["HalfStorage"],
    "bfloat16": _bfloat16,
    "int64": _STORAGE_DTYPES["LongStorage"],
    "long": _STORAGE_DTYPES["LongStorage"],
    "int32": _STORAGE_DTYPES["IntStorage"],
    "int": _STORAGE_DTYPES["IntStorage"],
    "int16": _STORAGE_DTYPES["ShortStorage"],
    "short": _STORAGE_DTYPES["ShortStorage"],
    "int8": _STORAGE_DTYPES["CharStorage"],
    "uint8": _STORAGE_DTYPES["ByteStorage"],
    "bool": _STORAGE_DTYPES["BoolStorage"],
}


class _Frozen:
    """Immutable after construction: the pickle's BUILD opcode (``__setstate__`` /
    attribute assignment) must not be able to change, e.g., the dtype a storage class
    reads its bytes with."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise UnsafeCheckpointError(f"refusing to set attribute {name!r} on {self!r}")


class _StorageType(_Frozen):
    """Stands in for ``torch.FloatStorage`` & co.: a name and a dtype, not callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name]())

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _TorchDtype(_Frozen):
    """Stands in for ``torch.float32`` & co."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _TORCH_DTYPES[name]())

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Frozen):
    """A loaded storage: a flat 1-D NumPy array of its elements (filled later in the
    legacy format, through `_fill`)."""

    __slots__ = ("array", "key")

    def __init__(self, array: np.ndarray, key: str):
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "key", key)

    def _fill(self, array: np.ndarray) -> None:
        object.__setattr__(self, "array", array)

    def __repr__(self) -> str:
        return f"storage {self.key}"


def _check_int_tuple(value: Any, what: str, source: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{source}: tensor {what} must be a tuple of non-negative ints, "
                         f"got {value!r}")
    return tuple(value)


def _rebuild_array(storage: Any, storage_offset: Any, size: Any, stride: Any,
                   source: str, dtype: np.dtype | None = None) -> np.ndarray:
    """NumPy copy of the strided view ``storage[offset + sum_i idx_i * stride_i]``.

    Args:
      storage: a `_Storage` (1-D array of N elements).
      storage_offset: first element of the view.
      size: shape (d_0, ..., d_{k-1}).
      stride: per-axis step in elements.
      dtype: reinterpret the storage bytes as this dtype first (untyped storages).
    Returns:
      A contiguous array of shape ``size``.
    Raises:
      ValueError: if any index of the view falls outside the storage; as_strided
        would otherwise read foreign memory.
    """
    if not isinstance(storage, _Storage):
        raise ValueError(f"{source}: a tensor's storage is {type(storage).__name__}, "
                         "expected a storage persistent id")
    flat = storage.array
    if dtype is not None and dtype != flat.dtype:
        if flat.nbytes % dtype.itemsize:
            raise ValueError(f"{source}: storage {storage.key} of {flat.nbytes} bytes is not "
                             f"a whole number of {dtype} elements")
        flat = flat.view(dtype)
    size = _check_int_tuple(size, "size", source)
    stride = _check_int_tuple(stride, "stride", source)
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ValueError(f"{source}: tensor storage_offset must be a non-negative int, "
                         f"got {storage_offset!r}")
    if len(size) != len(stride):
        raise ValueError(f"{source}: tensor size {size} and stride {stride} differ in length")
    if 0 in size:
        return np.zeros(size, flat.dtype)
    if math.prod(size) > flat.size:
        # Only expanded (stride-0) views can be larger than their storage; a state dict
        # has none, and a file claiming one could exhaust memory.
        raise ValueError(f"{source}: tensor of size {size} has more elements than its "
                         f"storage {storage.key} ({flat.size})")
    last = storage_offset + sum((d - 1) * s for d, s in zip(size, stride))
    if last >= flat.size:
        raise ValueError(
            f"{source}: tensor with size {size}, stride {stride}, offset {storage_offset} "
            f"reaches element {last} of storage {storage.key} which holds {flat.size}")
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size,
        strides=tuple(s * flat.dtype.itemsize for s in stride), writeable=False)
    out = np.array(view, order="C")
    if not out.dtype.isnative:
        out = out.astype(out.dtype.newbyteorder("="))
    return out


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a tensor state dict needs."""

    def __init__(self, file: BinaryIO, source: str,
                 load_storage: Callable[[tuple], _Storage] | None):
        # Python 2 pickles (the BN-Inception port) store names as byte strings.
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._load_storage = load_storage
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        }
        for name in _STORAGE_DTYPES:
            self._allowed[("torch", name)] = _StorageType(name)
        for name in _TORCH_DTYPES:
            self._allowed[("torch", name)] = _TorchDtype(name)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to unpickle global '{module}.{name}'; only "
                "tensors, storages and (Ordered)dicts are allowed in a weights file "
                "(a file that names other globals could run code on load)") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise pickle.UnpicklingError(
                f"{self._source}: unexpected persistent id {pid!r} outside the object pickle")
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise UnsafeCheckpointError(
                f"{self._source}: refusing persistent id {pid!r}; only storages are allowed "
                "(whole pickled modules are not weights files)")
        return self._load_storage(pid)

    # The rebuild functions receive the arguments torch's Tensor.__reduce_ex__ wrote
    # (backward hooks, metadata and parameter state are dropped). They only record
    # them: in the legacy format the storage bytes come after the object pickle, so
    # arrays are built by `_resolve` once every storage is filled.
    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return _LazyTensor((storage, storage_offset, size, stride), self._source)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return _LazyTensor((storage, storage_offset, size, stride), self._source)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad,
                           backward_hooks, dtype, metadata=None):
        if not isinstance(dtype, _TorchDtype):
            raise ValueError(f"{self._source}: _rebuild_tensor_v3 dtype is {dtype!r}, "
                             "expected a torch dtype")
        return _LazyTensor((storage, storage_offset, size, stride), self._source, dtype.dtype)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, _LazyTensor):
            raise ValueError(f"{self._source}: a Parameter wraps {type(data).__name__}, "
                             "expected a tensor")
        return data


class _LazyTensor:
    """A tensor's rebuild arguments, turned into an array by `_resolve`."""

    def __init__(self, args: tuple, source: str, dtype: np.dtype | None = None):
        self.args = args
        self.source = source
        self.dtype = dtype


def _resolve(obj: Any) -> Any:
    """Replace every `_LazyTensor` in the unpickled containers by its array."""
    if isinstance(obj, _LazyTensor):
        return _rebuild_array(*obj.args, source=obj.source, dtype=obj.dtype)
    if isinstance(obj, dict):  # OrderedDict included; keeps its type and order
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _storage_nbytes(storage_type: Any, numel: Any, key: str, source: str) -> int:
    """The bytes a storage's persistent id says it holds: what its record may inflate to."""
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"{source}: storage {key} has type {storage_type!r}, "
                         "expected a torch storage class")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"{source}: storage {key} has element count {numel!r}")
    # An untyped storage's count is already in bytes (its dtype here is uint8).
    return numel * storage_type.dtype.itemsize


def _storage_array(raw: bytes, storage_type: Any, numel: Any, key: str, source: str,
                   byteorder: str) -> np.ndarray:
    """Interpret raw storage bytes as ``numel`` elements of the storage's dtype."""
    if not isinstance(storage_type, _StorageType):
        raise ValueError(f"{source}: storage {key} has type {storage_type!r}, "
                         "expected a torch storage class")
    dtype = storage_type.dtype
    if storage_type.name == "UntypedStorage":
        # Untyped storages count bytes, whatever dtype their tensors use.
        numel = len(raw)
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{source}: storage {key} has element count {numel!r}")
    expected = numel * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{source}: storage {key} holds {len(raw)} bytes, expected "
                         f"{numel} x {dtype.itemsize} = {expected}")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if byteorder == "little" else ">")
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _read_record(archive: zipfile.ZipFile, name: str, limit: int, path: str,
                 what: str) -> bytes:
    """The bytes of zip entry `name`, inflating at most `limit` + 1 bytes.

    The declared (header) size is checked against `limit` before anything is inflated,
    and the entry is read through a bounded stream, so a header that understates the
    size cannot make us inflate more than the limit either."""
    info = archive.getinfo(name)
    if info.compress_type not in _BOUNDED_COMPRESSION:
        raise ValueError(f"{path}: {what} {name} uses zip compression method "
                         f"{info.compress_type}; only stored (0) and deflated (8) entries "
                         "are read (torch.save stores them uncompressed)")
    if info.file_size > limit:
        raise ValueError(f"{path}: {what} {name} declares {info.file_size} bytes, more "
                         f"than the {limit} it may hold; refusing to inflate it")
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > _RATIO_FLOOR
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
        raise ValueError(f"{path}: {what} {name} would inflate {info.compress_size} bytes "
                         f"to {info.file_size}, more than {MAX_COMPRESSION_RATIO}-fold "
                         "(weights do not compress like that: a zip bomb?); refusing it")
    with archive.open(info) as stream:
        raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"{path}: {what} {name} inflates past the {limit} bytes it may "
                         f"hold (its header declared {info.file_size})")
    return raw


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a torch zip checkpoint holds exactly one "
                             f"'<prefix>/data.pkl'; found {pickles or 'none'}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = _read_record(archive, prefix + "byteorder", _MAX_SMALL_RECORD_BYTES,
                                     path, "record").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: byteorder record says {byteorder!r}")
        cache: dict[tuple[str, str], _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            if len(pid) != 5:
                raise ValueError(f"{path}: storage persistent id {pid!r} has {len(pid)} "
                                 "fields, expected 5 (zip format)")
            _, storage_type, key, _location, numel = pid
            key = str(key)
            cache_key = (key, getattr(storage_type, "name", ""))
            if cache_key not in cache:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise ValueError(f"{path}: storage record {record} is missing")
                raw = _read_record(archive, record,
                                   _storage_nbytes(storage_type, numel, key, path),
                                   path, "storage record")
                array = _storage_array(raw, storage_type, numel, key, path, byteorder)
                cache[cache_key] = _Storage(array, key)
            return cache[cache_key]

        data = _read_record(archive, pickles[0], MAX_PICKLE_BYTES, path, "object pickle")
        return _SafeUnpickler(io.BytesIO(data), path, load_storage).load()


def _read_legacy(path: str) -> Any:
    size = os.path.getsize(path)

    def remaining(f) -> int:
        return size - f.tell()

    with open(path, "rb") as f:
        header = []
        for what in ("magic number", "protocol version", "system info"):
            try:
                header.append(_SafeUnpickler(f, path, None).load())
            except UnsafeCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means "not this format"
                raise ValueError(f"{path}: not a PyTorch checkpoint (cannot read the legacy "
                                 f"{what}: {e})") from e
        magic, protocol, sys_info = header
        if magic != _LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path}: not a PyTorch checkpoint (magic number {magic!r})")
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        byteorder = "little" if little else "big"

        # The object pickle comes before the storage bytes: collect the storages it
        # refers to, then fill them in the order of the key list that follows.
        pending: dict[str, tuple[Any, int]] = {}
        storages: dict[str, _Storage] = {}

        def load_storage(pid: tuple) -> _Storage:
            if len(pid) != 6:
                raise ValueError(f"{path}: storage persistent id {pid!r} has {len(pid)} "
                                 "fields, expected 6 (legacy format)")
            _, storage_type, key, _location, numel, view_metadata = pid
            if view_metadata is not None:
                raise ValueError(f"{path}: storage views (very old torch files) are not "
                                 f"supported: {pid!r}")
            key = str(key)
            if not isinstance(storage_type, _StorageType):
                raise ValueError(f"{path}: storage {key} has type {storage_type!r}")
            if key not in storages:
                pending[key] = (storage_type, numel)
                # Filled in place below once the bytes are read.
                storages[key] = _Storage(np.empty(0, storage_type.dtype), key)
            return storages[key]

        result = _SafeUnpickler(f, path, load_storage).load()
        keys = _SafeUnpickler(f, path, None).load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(pending):
            raise ValueError(f"{path}: storage key list {keys!r} does not match the "
                             f"storages used {sorted(pending)}")
        for key in map(str, keys):
            storage_type, numel = pending[key]
            count_bytes = f.read(8)
            if len(count_bytes) != 8:
                raise ValueError(f"{path}: file ends before storage {key}")
            (count,) = struct.unpack("<q" if little else ">q", count_bytes)
            if count != numel:
                raise ValueError(f"{path}: storage {key} has {count} elements on disk, "
                                 f"{numel} in its id")
            nbytes = count * storage_type.dtype.itemsize
            if nbytes > remaining(f):
                raise ValueError(f"{path}: storage {key} claims {nbytes} bytes, the file has "
                                 f"{remaining(f)} left")
            raw = f.read(nbytes)
            storages[key]._fill(_storage_array(raw, storage_type, numel, key, path,
                                               byteorder))
    return result


def read_torch_file(path: str | os.PathLike) -> Any:
    """Load the object saved by ``torch.save`` with tensors as NumPy arrays.

    Args:
      path: a ``.pth``/``.pt`` file in the zip or the legacy format.
    Returns:
      The saved object (usually an ``OrderedDict`` of name -> ``np.ndarray``, maybe
      nested in dicts/lists), every tensor a contiguous NumPy array in native order.
    Raises:
      FileNotFoundError: the file does not exist.
      UnsafeCheckpointError: the pickle names a global other than the tensor-building
        ones (nothing named in the file is ever called in that case).
      ValueError: the file is malformed (bad magic, truncated storage, out-of-range view).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _resolve(_read_zip(path))
        return _resolve(_read_legacy(path))
    except UnsafeCheckpointError as e:
        if path in str(e):
            raise
        raise UnsafeCheckpointError(f"{path}: {e}") from e
    except (ValueError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle fails in many ways
        raise ValueError(f"{path}: not a readable PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint and return its flat ``name -> array`` state dict.

    Accepts a bare state dict or the common wrappers ``{'state_dict': ...}`` and
    ``{'model': ...}``; strips the ``module.`` prefix that ``nn.DataParallel`` adds.

    Raises:
      ValueError: the file holds no dict of arrays (e.g. non-array values).
    """
    obj = read_torch_file(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)}: expected a state dict, found "
                         f"{type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{os.fspath(path)}: state dict entry {key!r} is "
                             f"{type(value).__name__}, expected a tensor")
        name = str(key)
        state[name[len("module."):] if name.startswith("module.") else name] = value
    return state
