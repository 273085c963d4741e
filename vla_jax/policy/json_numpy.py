"""The `json_numpy` wire format of OpenVLA's deploy server and clients, through the `json-numpy` package.

An array travels as the JSON object
    {"__numpy__": <base64 of the raw C-order bytes>, "dtype": <numpy descr, e.g. "|u1", "<f8">,
     "shape": [d0, d1, ...]}
and a shape of [] is a numpy scalar. Encoding and decoding are the package's own (`json_numpy.default`,
`json_numpy.object_hook`: what OpenVLA's clients call after `json_numpy.patch()`), so the bytes on the
wire are theirs by construction.

The package decodes whatever it is given: it base64-decodes before looking at dtype or shape, silently
drops characters outside the base64 alphabet, and its errors (KeyError, binascii.Error, a reshape
ValueError) do not say which field is wrong. A server must bound the memory a request can make it
allocate and tell the client what to fix, so `decode_array` first checks the object's structure, the
dtype, the shape and the byte count (from the base64 length, before decoding) and only then hands it to
the package; anything the package still rejects becomes a ValueError naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

import json_numpy as _pkg
import numpy as np

MARKER = "__numpy__"
MAX_DIMS = 32


def encode_array(a) -> dict:
    """ndarray / numpy scalar -> the json_numpy object (dict), as the package writes it."""
    a = np.asarray(a)
    if a.dtype.hasobject:
        raise ValueError(f"cannot encode an object array (dtype {a.dtype}) as json_numpy")
    obj = _pkg.default(np.ascontiguousarray(a) if a.ndim else a[()])
    return dict(obj, shape=[int(d) for d in obj["shape"]])


def _decoded_size(data: str) -> int:
    """Bytes a well-formed base64 string of this length decodes to (-1 when its length cannot be base64)."""
    if len(data) % 4:
        return -1
    pad = len(data) - len(data.rstrip("="))
    return len(data) // 4 * 3 - min(pad, 2) if data else 0


def decode_array(obj: dict, max_bytes: int | None = None):
    """json_numpy object -> ndarray (or a numpy scalar for shape []).

    Raises ValueError naming the field when the dtype, shape or data are malformed, or when the byte
    count does not match dtype x shape; with `max_bytes`, arrays larger than that are refused before
    any decoding.
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
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"json_numpy 'shape' must be a list of non-negative integers, got {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise ValueError(f"json_numpy array of shape {shape} and dtype {descr} holds {nbytes} bytes, more than "
                         f"the {max_bytes} accepted")
    have = _decoded_size(data)
    if have < 0:
        raise ValueError(f"json_numpy {MARKER!r} is not valid base64 (length {len(data)} is not a multiple of 4)")
    if have != nbytes:
        raise ValueError(f"json_numpy data holds {have} bytes but shape {shape} x dtype {descr} needs {nbytes}")
    try:
        return _pkg.object_hook({MARKER: data, "dtype": descr, "shape": shape})
    except ValueError:  # the package drops non-alphabet characters: fewer bytes than the shape needs
        raise ValueError(f"json_numpy {MARKER!r} is not valid base64") from None


def _hook(obj: dict):
    return decode_array(obj) if MARKER in obj else obj


def dumps(obj: Any, **kw) -> str:
    """json.dumps with numpy arrays and scalars written as json_numpy objects (the package's `dumps`)."""
    return _pkg.dumps(obj, **kw)


def loads(text: str | bytes, **kw) -> Any:
    """json.loads that turns json_numpy objects back into arrays, checked as in `decode_array`."""
    return json.loads(text, object_hook=_hook, **kw)
