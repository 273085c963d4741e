"""Synthetic training batches with the real pipeline's structure, for tests, benchmarks and planning.

Every row is a pure function of (seed, batch index, global row index), so any process can build
exactly its rows of the global batch, and a restarted run continues with the same batches: the
iterator's position is one integer.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, Optional

import numpy as np

from vla_jax.spec import IGNORE_INDEX, BatchSpec


def synthetic_row(seed: int, batch_index: int, row: int, spec: BatchSpec,
                  image_palette: Optional[int] = None) -> Dict[str, np.ndarray]:
    """One example with the keys of `spec.layout()` (plus attention_mask, and the normalized actions
    [K * D] when the layout has no `actions` key), laid out like OpenVLA's:
    [BOS] prompt [29871] a_1..a_{K*D} [EOS] PAD... (labels on the actions and EOS). image_palette: if
    set, the image and instruction are drawn from that many fixed 'scenes' (a learnable task: each
    scene has its own action), else everything is random."""
    codec, seq_len = spec.codec, spec.text_len
    n_act, pad = codec.num_action_tokens, codec.base_vocab_size
    rng = np.random.default_rng([seed, batch_index, row])
    scene = int(rng.integers(image_palette)) if image_palette else None
    srng = np.random.default_rng([seed, 10**9 + scene]) if scene is not None else rng
    prompt_len = int(srng.integers(4, max(5, seq_len - n_act - 4)))
    prompt = srng.integers(3, codec.first_id, size=prompt_len)
    actions = srng.uniform(-1, 1, size=n_act).astype(np.float32)
    action_ids = codec.encode(actions)
    ids = np.concatenate([[1], prompt, [29871], action_ids, [2]]).astype(np.int32)
    if ids.size > seq_len:
        raise ValueError(f"synthetic row needs {ids.size} text tokens but BatchSpec.text_len={seq_len}")
    input_ids = np.full(seq_len, pad, np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, np.int32)
    input_ids[:ids.size] = ids
    labels[ids.size - codec.num_supervised:ids.size] = ids[-codec.num_supervised:]
    pixels = srng.integers(0, 256, size=spec.image_shape(), dtype=np.uint8)
    layout = spec.layout()
    out = {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": (input_ids != pad).astype(np.int32),
           "labels": labels, "actions": actions.reshape(layout["actions"][0]) if "actions" in layout else actions,
           "dataset_index": np.int32(int(rng.integers(spec.num_datasets)))}
    if "proprio" in layout:
        out["proprio"] = srng.uniform(-1, 1, size=layout["proprio"][0]).astype(np.float32)
    return out


class SyntheticBatches:
    """Iterator over this process's rows [row_start, row_stop) of deterministic global batches laid
    out by `spec`.

    `get_state()` / `set_state()` expose the position (the next batch index) for checkpoints.
    """

    def __init__(self, global_batch: int, spec: BatchSpec, seed: int = 0, row_start: int = 0,
                 row_stop: Optional[int] = None, image_palette: Optional[int] = None):
        if spec.text_len < spec.codec.num_action_tokens + 6:
            raise ValueError(f"synthetic text_len={spec.text_len} too short for a prompt plus "
                             f"{spec.codec.num_action_tokens} action tokens")
        self.global_batch, self.spec, self.seed = global_batch, spec, seed
        self.rows = (row_start, global_batch if row_stop is None else row_stop)
        self.image_palette = image_palette
        self.next_index = 0
    def get_state(self) -> np.ndarray:
        """uint8 array (JSON bytes), like the real pipeline's state."""
        s = {"format": "vla_jax-synthetic-v1", "next_index": int(self.next_index), "seed": int(self.seed)}
        return np.frombuffer(json.dumps(s).encode(), np.uint8).copy()

    def set_state(self, state) -> None:
        s = json.loads(bytes(np.asarray(state, np.uint8)).decode())
        if s.get("format") != "vla_jax-synthetic-v1" or int(s["seed"]) != self.seed:
            raise ValueError(f"data state {s} was not saved by a synthetic source with seed {self.seed}")
        self.next_index = int(s["next_index"])

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        rows = [synthetic_row(self.seed, self.next_index, r, self.spec, self.image_palette)
                for r in range(*self.rows)]
        self.next_index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
