"""A small reader and writer of the safetensors format, so that exported weights need no extra dependency.

The format (huggingface/safetensors, "Format"): an 8-byte little-endian unsigned integer n, then n bytes of a UTF-8
JSON object (padded with trailing spaces), then the data section.  Each JSON entry but ``__metadata__`` maps a
tensor name to ``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}``, offsets relative to the start of the
data section; the tensor's bytes are its elements in row-major (C) order, little-endian.  ``__metadata__`` is an
optional object of string -> string.

``read`` validates everything before it builds a tensor, and any defect is one ``SafetensorsError`` naming the file and
the defect: a file shorter than its header, a header length beyond ``MAX_HEADER_BYTES`` (100 MB, the library's own
limit) or beyond the file, a header that is not UTF-8 JSON or not an object, duplicate names, unknown dtypes, shapes
that are not lists of non-negative integers, offsets that are not ``[begin, end]`` integers within the data section,
a byte count that differs from shape x item size, overlapping tensors, or bytes of the data section that belong to no
tensor (the library refuses those too), and metadata that is not string -> string.  Nothing is unpickled or
evaluated: the only code path from the file is ``json.loads`` and a byte copy.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Dict, Mapping, Optional, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["read", "write", "serialize", "deserialize", "SafetensorsError", "DTYPES", "MAX_HEADER_BYTES"]

#: the format's dtype names -> torch dtypes (the 8-bit float variants only where this torch has them)
DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


class SafetensorsError(ValueError):
    """A file (or bytes) that is not a valid safetensors file, or tensors that cannot be written as one."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    raw = t.reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:       # the format is little-endian
        raw = raw.reshape(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def serialize(tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (name -> tensor; stored in name order) and ``metadata``."""
    header: Dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise SafetensorsError(f"safetensors metadata must map strings to strings; bad entries: {bad[:3]}")
        header[METADATA_KEY] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise SafetensorsError(f"tensor name {name!r} cannot be written (a non-empty string, not {METADATA_KEY})")
        if not isinstance(t, Tensor):
            raise SafetensorsError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store "
                                   f"(supported: {', '.join(str(d) for d in _NAMES)})")
        if t.layout != torch.strided:
            t = t.to_dense()
        data = _tensor_bytes(t)
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)                  # pad so the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsError(f"the header names {k!r} twice")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def deserialize(buf: bytes, where: str = "<bytes>") -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` from the bytes of a safetensors file, validated (module doc); ``where`` names the
    source in errors."""
    def fail(reason):
        return SafetensorsError(f"{where} is not a valid safetensors file: {reason}")

    size = len(buf)
    if size < 8:
        raise fail(f"it is {size} bytes long, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER_BYTES:
        raise fail(f"its header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n < 2 or 8 + n > size:
        raise fail(f"its header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except SafetensorsError as e:
        raise fail(str(e)) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"its header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise fail("its __metadata__ is not an object of strings")
    data_size = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not name:
            raise fail("a tensor has an empty name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail(f"entry {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise fail(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise fail(f"tensor {name!r} has data_offsets {offs!r}, not [begin, end] integers")
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise fail(f"tensor {name!r} spans bytes [{begin}, {end}) outside the data section of {data_size} bytes")
        want = math.prod(shape) * _itemsize(DTYPES[dtype])
        if end - begin != want:
            raise fail(f"tensor {name!r} ({dtype}, shape {shape}) needs {want} bytes but spans {end - begin}")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise fail(f"tensor {name!r} overlaps the tensor before it (bytes {begin} < {pos})")
        if begin > pos:
            raise fail(f"bytes [{pos}, {begin}) of the data section belong to no tensor")
        pos = end
    if pos != data_size:
        raise fail(f"bytes [{pos}, {data_size}) of the data section belong to no tensor")
    base = 8 + n
    tensors = {}
    for begin, end, name in spans:
        entry = header[name]
        dtype = DTYPES[entry["dtype"]]
        raw = bytearray(buf[base + begin:base + end])
        if not raw:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        t = torch.frombuffer(raw, dtype=torch.uint8)
        item = _itemsize(dtype)
        if sys.byteorder == "big" and item > 1:
            t = t.reshape(-1, item).flip(1).reshape(-1).clone()
        tensors[name] = t.view(dtype).reshape(entry["shape"])
    return tensors, dict(metadata)


def write(path: str, tensors: Mapping[str, Tensor], metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write ``tensors`` to ``path`` atomically (``atomic.atomic_write_bytes``: a temporary file renamed onto the
    target, fsynced); returns the path."""
    from .atomic import atomic_write_bytes
    atomic_write_bytes(serialize(tensors, metadata), path, durable=True)
    return path


def read(path: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path`` (validated; ``SafetensorsError`` for any defect)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) == 8 and struct.unpack("<Q", head)[0] > MAX_HEADER_BYTES:
                return deserialize(head, where=path)        # rejected before reading the rest
            buf = head + f.read()
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e.strerror or e}") from None
    if len(buf) != size:
        raise SafetensorsError(f"{path} changed size while it was read")
    return deserialize(buf, where=path)
