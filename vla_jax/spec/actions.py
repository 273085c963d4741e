"""ActionCodec: how actions are represented, supervised and read back — the one decoder.

OpenVLA writes a normalized action a in [-1, 1]^D as D token ids, the last `n_bins` ids of the base
vocabulary (OPENVLA_REFERENCE.md §3): edges `linspace(-1, 1, n_bins)`, `id = base_vocab_size -
digitize(a, edges)`, decoded through the `n_bins - 1` bin centres with the index clipped (non-action
ids decode to the nearest end, exactly as upstream). Raw actions come from BOUNDS_Q99 statistics:
`raw = 0.5 (a + 1) (q99 - q01) + q01` where the statistics' mask is True, the value itself elsewhere
(the gripper), computed in float64 as OpenVLA's `predict_action` does.

An action chunk (OFT) is K consecutive actions [K, D]; its tokens are the chunk flattened
timestep-major, K * D ids, then `</s>`. With `chunk_size=1` the codec is OpenVLA's.

Fields:
  action_dim D, n_bins, base_vocab_size (the action ids sit at its top), chunk_size K,
  decoding: 'autoregressive' (OpenVLA: one token after another with a KV cache) or 'parallel'
    (OFT: all K * D slots in one bidirectional pass),
  head: 'tokens' (argmax over the vocabulary at each slot, then the bins) or 'l1' (a continuous head
    regressing the normalized chunk; its loss is L1).

Pure numpy (and `jax.numpy` where an array module is passed): safe on the serving path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

import numpy as np

DECODINGS = ("autoregressive", "parallel")
HEADS = ("tokens", "l1")


def known_fields(cls, d: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """A JSON asset's dict -> constructor kwargs of dataclass `cls`; an unknown field (a newer or corrupt
    asset) is a ValueError naming it, never silently dropped."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}; known: {sorted(fields)}")
    return dict(d)


@dataclasses.dataclass(frozen=True)
class ActionCodec:
    action_dim: int = 7
    n_bins: int = 256
    base_vocab_size: int = 32000
    chunk_size: int = 1
    decoding: str = "autoregressive"
    head: str = "tokens"

    def __post_init__(self):
        for name in ("action_dim", "n_bins", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ActionCodec.{name}={getattr(self, name)} must be >= 1")
        if self.base_vocab_size <= self.n_bins:
            raise ValueError(f"ActionCodec: base_vocab_size={self.base_vocab_size} must exceed n_bins={self.n_bins}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"ActionCodec.decoding={self.decoding!r}; expected one of {DECODINGS}")
        if self.head not in HEADS:
            raise ValueError(f"ActionCodec.head={self.head!r}; expected one of {HEADS}")
        if self.head == "l1" and self.decoding != "parallel":
            raise ValueError("ActionCodec.head='l1' needs decoding='parallel' (the L1 head reads all action slots "
                             "of one bidirectional pass)")
        if self.chunk_size > 1 and self.decoding != "parallel":
            raise ValueError(f"ActionCodec.chunk_size={self.chunk_size} needs decoding='parallel' (OpenVLA's "
                             f"autoregressive decoding predicts one action)")

    # -- layout -----------------------------------------------------------------------------------

    @property
    def num_action_tokens(self) -> int:
        """Action slots in the sequence: chunk_size * action_dim (7 for OpenVLA)."""
        return self.chunk_size * self.action_dim

    @property
    def num_supervised(self) -> int:
        """Labelled text positions per example: the action tokens and `</s>` (8 for OpenVLA)."""
        return self.num_action_tokens + 1

    @property
    def chunk_shape(self):
        """(K, D): the shape of one predicted chunk (K = 1 for OpenVLA)."""
        return (self.chunk_size, self.action_dim)

    @property
    def first_id(self) -> int:
        """Smallest action id (the encoding of +1): 31744 for Llama-2."""
        return self.base_vocab_size - self.n_bins

    @property
    def last_id(self) -> int:
        """Largest action id (the lowest bin): 31999 for Llama-2."""
        return self.base_vocab_size - 1

    @property
    def bin_edges(self) -> np.ndarray:
        return np.linspace(-1.0, 1.0, self.n_bins)  # float64, as upstream

    @property
    def bin_centers(self) -> np.ndarray:
        e = self.bin_edges
        return (e[:-1] + e[1:]) / 2.0

    # -- ids <-> normalized -----------------------------------------------------------------------

    def encode(self, normalized) -> np.ndarray:
        """normalized float [..., n] -> int32 ids [..., n] in [first_id, last_id] (clipped to [-1, 1])."""
        a = np.clip(np.asarray(normalized), -1.0, 1.0)
        if not np.all(np.isfinite(a)):
            raise ValueError("ActionCodec.encode got NaN actions; normalized actions must be finite")
        return (self.base_vocab_size - np.digitize(a, self.bin_edges)).astype(np.int32)

    def decode(self, ids, xp=np):
        """ids int [..., n] -> normalized actions [..., n]: float64 with numpy (inference, as upstream),
        float32 with `xp=jax.numpy` (traced, for training metrics). Non-action ids are clipped."""
        centers = self.bin_centers
        if xp is np:
            idx = np.clip(self.base_vocab_size - np.asarray(ids, np.int64) - 1, 0, centers.shape[0] - 1)
            return centers[idx]
        table = xp.asarray(centers, xp.float32)
        return table[xp.clip(self.base_vocab_size - ids - 1, 0, centers.shape[0] - 1)]

    def is_action_id(self, ids, xp=np):
        return (ids >= self.first_id) & (ids <= self.last_id)

    def as_chunk(self, flat) -> np.ndarray:
        """[..., K * D] (timestep-major) -> [..., K, D]."""
        flat = np.asarray(flat)
        if flat.shape[-1] != self.num_action_tokens:
            raise ValueError(f"expected {self.num_action_tokens} = chunk_size {self.chunk_size} x action_dim "
                             f"{self.action_dim} values in the last axis, got shape {flat.shape}")
        return flat.reshape(flat.shape[:-1] + self.chunk_shape)

    # -- normalized <-> raw -----------------------------------------------------------------------

    @staticmethod
    def action_statistics(entry: Mapping[str, Any], where: str = "statistics"):
        """One dataset's statistics entry ({'action': {q01, q99, mask?, ...}}) -> float64 q01, q99, bool mask."""
        if not isinstance(entry, Mapping) or "action" not in entry:
            raise ValueError(f"{where}: expected a dataset entry with an 'action' key, got "
                             f"{sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__}")
        a = entry["action"]
        q01, q99 = np.asarray(a["q01"], np.float64), np.asarray(a["q99"], np.float64)
        mask = np.asarray(a.get("mask", [True] * len(q01)), bool)
        if q01.shape != q99.shape or mask.shape != q01.shape or q01.ndim != 1:
            raise ValueError(f"{where}: action q01 {q01.shape}, q99 {q99.shape} and mask {mask.shape} must be "
                             f"equal 1-D shapes")
        return q01, q99, mask

    def unnormalize(self, normalized, entry: Mapping[str, Any], where: str = "statistics") -> np.ndarray:
        """float [..., D] in [-1, 1] -> float64 raw actions with the entry's q01/q99 (mask False: unchanged).
        No epsilon, as upstream."""
        q01, q99, mask = self.action_statistics(entry, where)
        x = np.asarray(normalized, np.float64)
        if x.shape[-1] != q01.shape[0]:
            raise ValueError(f"actions have {x.shape[-1]} dims but the {where} have {q01.shape[0]}")
        return np.where(mask, 0.5 * (x + 1.0) * (q99 - q01) + q01, x)

    def ids_to_actions(self, ids, entry: Mapping[str, Any], where: str = "statistics") -> np.ndarray:
        """Generated ids [..., n] -> float64 raw actions [..., n] (decode, then un-normalize)."""
        return self.unnormalize(self.decode(ids), entry, where)

    # -- asset ------------------------------------------------------------------------------------

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "action_codec") -> "ActionCodec":
        return cls(**known_fields(cls, d, where))

    @classmethod
    def for_model(cls, model_config, action_dim: Optional[int] = None) -> "ActionCodec":
        """The codec a model config implies (OpenVLAConfig fields; OFT fields when present)."""
        return cls(action_dim=int(action_dim if action_dim is not None else model_config.action_dim),
                   n_bins=int(model_config.n_action_bins), base_vocab_size=int(model_config.base_vocab_size),
                   chunk_size=int(getattr(model_config, "chunk_size", 1)),
                   decoding="parallel" if getattr(model_config, "parallel_decoding", False) else "autoregressive",
                   head=str(getattr(model_config, "action_head", "tokens")))

    def check_matches(self, other: "ActionCodec", what: str) -> None:
        """ValueError naming every field where `other` (e.g. what a request or config asks) differs."""
        diff = {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)}
        if diff:
            desc = ", ".join(f"{k}={b!r} (the checkpoint has {a!r})" for k, (a, b) in diff.items())
            raise ValueError(f"{what} does not match the checkpoint's action codec: {desc}")
