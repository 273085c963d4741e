"""The `json_numpy` wire format OpenVLA's deploy server and its robot clients use, without the package.

An array travels as the JSON object
    {"__numpy__": <base64 of the raw C-order bytes>, "dtype": <numpy descr, e.g. "|u1", "<f8">,
     "shape": [d0, d1, ...]}
and a shape of [] is a numpy scalar. `dumps`/`loads` behave like `json.dumps`/`json.loads` with
json_numpy's hooks installed, so payloads and responses round-trip with unmodified OpenVLA clients.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

MARKER = "__numpy__"


def encode_array(a) -> dict:
    """ndarray / numpy scalar -> the json_numpy object (dict)."""
    a = np.asarray(a)
    if a.dtype.hasobject:
        raise ValueError(f"cannot encode an object array (dtype {a.dtype}) as json_numpy")
    data = np.ascontiguousarray(a).tobytes()
    return {MARKER: base64.b64encode(data).decode("ascii"), "dtype": np.lib.format.dtype_to_descr(a.dtype),
            "shape": [int(d) for d in a.shape]}


def decode_array(obj: dict, max_bytes: int | None = None):
    """json_numpy object -> ndarray (or a numpy scalar for shape []).

    Raises ValueError naming the field when the dtype, shape or data are malformed, or when the
    byte count does not match dtype x shape (checked before decoding when `max_bytes` is given).
    """
    if not isinstance(obj, dict) or MARKER not in obj:
        raise ValueError(f"expected a json_numpy object with keys {MARKER!r}, 'dtype', 'shape'")
    descr, shape, data = obj.get("dtype"), obj.get("shape"), obj[MARKER]
    if not isinstance(data, str):
        raise ValueError(f"json_numpy {MARKER!r} must be a base64 string, got {type(data).__name__}")
    if not isinstance(descr, str):
        raise ValueError(f"json_numpy 'dtype' must be a numpy dtype string such as '|u1', got {descr!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(descr)
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_numpy 'dtype' {descr!r} is not a numpy dtype: {e}") from None
    if dtype.hasobject:
        raise ValueError(f"json_numpy 'dtype' {descr!r} is an object dtype, which is not accepted")
    if (not isinstance(shape, list) or len(shape) > 32
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"json_numpy 'shape' must be a list of non-negative integers, got {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(f"json_numpy array of shape {shape} and dtype {descr} holds {nbytes} bytes, more than "
                         f"the {max_bytes} accepted")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"json_numpy {MARKER!r} is not valid base64") from None
    if len(raw) != nbytes:
        raise ValueError(f"json_numpy data holds {len(raw)} bytes but shape {shape} x dtype {descr} needs {nbytes}")
    arr = np.frombuffer(raw, dtype=dtype)
    return arr.reshape(shape) if shape else arr[0]


def _default(o):
    if isinstance(o, (np.ndarray, np.generic)):
        return encode_array(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _hook(obj: dict):
    return decode_array(obj) if MARKER in obj else obj


def dumps(obj: Any, **kw) -> str:
    """json.dumps with numpy arrays and scalars written as json_numpy objects."""
    return json.dumps(obj, default=_default, **kw)


def loads(text: str | bytes, **kw) -> Any:
    """json.loads that turns json_numpy objects back into arrays (raises ValueError on bad JSON/arrays)."""
    return json.loads(text, object_hook=_hook, **kw)
