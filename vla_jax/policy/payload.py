"""POST /act request bodies -> a checked `Request` (the wire format of `vla_jax.policy.server`).

The body is one JSON object (or {"encoded": "<that object as a JSON string>"}, deploy.py's double
encoding). Fields:
  instruction   str (required)
  unnorm_key    str or null (optional)
  gripper       'openvla' (default) | 'dataset' (optional)
  every other field is part of the observation: camera images by name and the raw proprio state, as
  `Policy.predict_action` takes them (vla_jax/policy/observation.py): OpenVLA's 'image'; the checkpoint's
  camera names or OpenVLA-OFT's 'full_image' / 'wrist_image'; 'state' (or 'proprio').
Images are json_numpy uint8 arrays (or nested lists of ints): RGB [H, W, 3], or what deploy.py converts
with PIL `convert("RGB")` (grayscale [H, W] / [H, W, 1], gray+alpha [H, W, 2], RGBA [H, W, 4]). The state
is a json_numpy array or a list of numbers. Which fields the served model needs (and that no unknown
camera is sent) is checked by the service against the checkpoint (`Policy.check_observation`).

Every problem is a `RequestError(400, message naming the field)`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Sequence

import numpy as np

from vla_jax.policy import json_numpy
from vla_jax.policy.observation import STATE_KEYS, camera_keys, describe_keys

MAX_IMAGE_SIDE = 4096
# Channel counts PIL's Image.fromarray maps to a mode deploy.py then converts with .convert("RGB").
_PIL_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# Request fields that only mean something for autoregressive token decoding (upstream's early-EOS ids,
# a token count, restricting the argmax to action tokens). The payload does not take them; a chunked
# (parallel-decoding) model names them in a 400 so an AR client pointed at an OFT server learns why.
AUTOREGRESSIVE_ONLY_FIELDS = ("stop_at_eos", "num_tokens", "action_tokens_only")
CONTROL_FIELDS = ("instruction", "unnorm_key", "gripper")


class RequestError(Exception):
    """Client error: sent back as `status` with {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = int(status), message


@dataclasses.dataclass
class Request:
    """A parsed /act body. observation: {field: uint8 RGB [H, W, 3] image, or the state as a float64
    array}, by the field names the client used; encoded: the body used deploy.py's "encoded" form."""

    observation: Dict[str, Any]
    instruction: str
    unnorm_key: Optional[str]
    encoded: bool
    gripper: str


def _to_rgb(value: np.ndarray, field: str) -> np.ndarray:
    """uint8 [H, W], [H, W, 1|2|3|4] -> uint8 [H, W, 3] exactly as deploy.py's `Image.fromarray(a).convert("RGB")`."""
    if value.dtype != np.uint8:
        raise RequestError(400, f"field {field!r} must have dtype uint8 ('|u1'), got {value.dtype.str!r} (shape "
                                f"{list(value.shape)}); float images are not accepted: send raw 0..255 values")
    channels = 1 if value.ndim == 2 else (value.shape[-1] if value.ndim == 3 else None)
    if channels not in _PIL_CHANNELS:
        raise RequestError(400, f"field {field!r} must have shape [H, W, 3] (RGB), [H, W, 4] (RGBA), [H, W, 2] or "
                                f"[H, W] (grayscale), got {list(value.shape)}")
    h, w = value.shape[:2]
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise RequestError(400, f"field {field!r} is {h}x{w}; each side must be in [1, {MAX_IMAGE_SIDE}]")
    if channels == 3:
        return value
    from PIL import Image  # only for non-RGB images

    gray = value.reshape(h, w) if channels == 1 else value
    return np.asarray(Image.fromarray(gray).convert("RGB"))


def _array(value: Any, field: str, max_bytes: int) -> Any:
    """A json_numpy object -> its array (errors name the field); anything else unchanged."""
    if isinstance(value, dict):
        try:
            return json_numpy.decode_array(value, max_bytes=max_bytes)
        except ValueError as e:
            raise RequestError(400, f"field {field!r}: {e}") from None
    return value


def as_image(value: Any, field: str, max_bytes: int) -> np.ndarray:
    """json_numpy object (or an already-decoded array / nested list of ints) -> uint8 [H, W, 3]."""
    value = _array(value, field, max_bytes)
    if isinstance(value, list):  # clients without json_numpy may send plain nested lists
        try:
            arr = np.asarray(value)
        except ValueError:
            raise RequestError(400, f"field {field!r}: a nested list must be rectangular [H, W, 3]") from None
        if arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 0 or arr.max() > 255:
            raise RequestError(400, f"field {field!r}: a nested list must hold integers in [0, 255] (got dtype "
                                    f"{arr.dtype}, shape {arr.shape})")
        value = arr.astype(np.uint8)
    if not isinstance(value, np.ndarray):
        raise RequestError(400, f"field {field!r} must be a json_numpy array, got {type(value).__name__}")
    return _to_rgb(value, field)


def as_state(value: Any, field: str, max_bytes: int) -> np.ndarray:
    """json_numpy array or list of numbers -> float64 array (its length is checked against the model later)."""
    value = _array(value, field, max_bytes)
    try:
        arr = np.asarray(value)
    except ValueError:
        raise RequestError(400, f"field {field!r}: a list must be a flat list of numbers") from None
    if arr.dtype.kind not in "iuf" or arr.ndim != 1:
        raise RequestError(400, f"field {field!r} must be a 1-D array of numbers (the raw proprio state), got "
                                f"dtype {arr.dtype}, shape {list(arr.shape)}")
    return arr.astype(np.float64)


def _json(text, what: str):
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, f"{what} nests JSON arrays/objects too deeply") from None


def parse_payload(body: bytes, max_bytes: int, codec=None, cameras: Optional[Sequence[str]] = None,
                  proprio_dim: Optional[int] = None) -> Request:
    """Request body -> `Request`. Raises RequestError(400). codec: the served model's ActionCodec; with
    decoding 'parallel', autoregressive-only fields are a 400 (an autoregressive model ignores them).
    cameras, proprio_dim: the served model's (its BatchSpec's); with them, a field that is neither a
    control field nor one of the model's observation keys is a 400 before any image is decoded."""
    payload = _json(body, "body")
    encoded = isinstance(payload, dict) and "encoded" in payload
    if encoded:
        if len(payload) != 1:
            raise RequestError(400, f"the 'encoded' form must be the only key; got keys {sorted(payload)}")
        if not isinstance(payload["encoded"], str):
            raise RequestError(400, "field 'encoded' must be a JSON string")
        payload = _json(payload["encoded"], "field 'encoded'")
    if not isinstance(payload, dict):
        raise RequestError(400, f"payload must be a JSON object, got {type(payload).__name__}")
    if codec is not None and codec.decoding == "parallel":
        bad = [k for k in AUTOREGRESSIVE_ONLY_FIELDS if k in payload]
        if bad:
            raise RequestError(400, f"field(s) {bad} need an autoregressive model; this server's model has "
                                    f"decoding='parallel', head={codec.head!r}, chunk_size={codec.chunk_size} "
                                    f"(OpenVLA-OFT: it returns the whole [{codec.chunk_size}, {codec.action_dim}] "
                                    f"chunk per request)")
    obs_fields = [k for k in payload if k not in CONTROL_FIELDS and k not in AUTOREGRESSIVE_ONLY_FIELDS]
    if cameras is not None:
        known = set(camera_keys(cameras)) | set(STATE_KEYS)
        unknown = [k for k in obs_fields if k not in known]
        if unknown:
            raise RequestError(400, f"unknown field(s) {unknown}: the payload takes {list(CONTROL_FIELDS)} and the "
                                    f"observation: {describe_keys(cameras, proprio_dim)}")
    missing = ([] if any(k not in STATE_KEYS for k in obs_fields) else ["image"]) + \
        [k for k in ("instruction",) if k not in payload]
    if missing:
        raise RequestError(400, f"payload is missing field(s) {missing}; it has {sorted(payload)}")
    instruction = payload["instruction"]
    if not isinstance(instruction, str):
        raise RequestError(400, f"field 'instruction' must be a string, got {type(instruction).__name__}")
    if not instruction.strip():
        raise RequestError(400, "field 'instruction' is empty")
    key = payload.get("unnorm_key")
    if key is not None and not isinstance(key, str):
        raise RequestError(400, f"field 'unnorm_key' must be a string or null, got {type(key).__name__}")
    gripper = payload.get("gripper", "openvla")
    if gripper not in ("openvla", "dataset"):
        raise RequestError(400, f"field 'gripper' must be 'openvla' or 'dataset', got {gripper!r}")
    observation = {k: as_state(payload[k], k, max_bytes) if k in STATE_KEYS else as_image(payload[k], k, max_bytes)
                   for k in obs_fields}
    return Request(observation, instruction, key, encoded, gripper)
