"""``.safetensors`` files read and written one tensor at a time, with plain file I/O.

The format: an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. A memory map (what the
``safetensors`` package uses) keeps every page read in the process's memory;
here each tensor is read into its own buffer, or written from one, so memory
holds one tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype names -> numpy
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
          "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def shard_path(folder, name: str, index) -> Path:
    """The shard ``name`` that the index file ``index`` names, which must be a file
    inside ``folder`` (an untrusted index may not point elsewhere)."""
    folder = Path(folder)
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents:
        raise ValueError(f"{index} names the shard {name!r}, which is outside {folder}; "
                         f"shards must be files in the model folder")
    return path


class SafetensorsFile:
    """The tensors of one ``.safetensors`` file, each read on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 2 <= n <= min(size - 8, 100 << 20):
                    raise ValueError(f"a header of {n} bytes")
                header = json.loads(f.read(n))
            self._start = 8 + n
            self.tensors = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if dtype not in DTYPES:
                    raise ValueError(f"tensor {name} has the unknown dtype {dtype!r}")
                nbytes = int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize
                if not (0 <= begin and end - begin == nbytes and self._start + end <= size):
                    raise ValueError(f"tensor {name}'s bytes {begin}..{end} do not fit its shape {shape} "
                                     f"or the file ({size} bytes)")
                self.tensors[name] = (dtype, shape, begin, end)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {self.path}: {e} (truncated or corrupt safetensors file?)") from e

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"cannot read tensor {name} from {self.path}: the file ends early (truncated?)")
        return np.frombuffer(buffer, DTYPES[dtype]).reshape(shape)


class SafetensorsWriter:
    """Write ``tensors`` (``{name: (numpy dtype, shape)}``, in file order) to
    ``path``: the header first, then ``write(name, array)`` for each in order."""

    def __init__(self, path, tensors: dict, metadata: dict | None = None):
        self.path, self._order, self._specs = Path(path), list(tensors), dict(tensors)
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(self.path, "wb")
        self._file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, name: str, array):
        expected = self._order.pop(0) if self._order else None
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order; expected {expected!r}")
        dtype, shape = self._specs[name]
        a = np.ascontiguousarray(array)
        if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
            raise ValueError(f"tensor {name}: {a.dtype} {a.shape}, declared {np.dtype(dtype)} {tuple(shape)}")
        self._file.write(a.tobytes())

    def close(self):
        self._file.close()
        if self._order:
            raise ValueError(f"{self.path}: {len(self._order)} declared tensor(s) never written, the first "
                             f"{self._order[0]!r}")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            self.close()
        else:
            self._file.close()
        return False
