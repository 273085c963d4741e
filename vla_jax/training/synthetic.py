"""Synthetic training batches with the real pipeline's structure, for tests, benchmarks and planning.

Every row is a pure function of (seed, batch index, global row index), so any process can build
exactly its rows of the global batch, and a restarted run continues with the same batches: the
iterator's position is one integer.
"""

from __future__ import annotations

import json
from typing import Dict, Iterator, Optional

import numpy as np

from vla_jax.tokenizer import IGNORE_INDEX, ActionTokenizer


def synthetic_row(seed: int, batch_index: int, row: int, image_size: int, seq_len: int, action_dim: int = 7,
                  num_datasets: int = 1, base_vocab_size: int = 32000, n_bins: int = 256,
                  image_palette: Optional[int] = None) -> Dict[str, np.ndarray]:
    """One example laid out like OpenVLA's: [BOS] prompt [29871] a_1..a_7 [EOS] PAD... (labels on the
    actions and EOS). image_palette: if set, the image and instruction are drawn from that many fixed
    'scenes' (a learnable task: each scene has its own action), else everything is random."""
    rng = np.random.default_rng([seed, batch_index, row])
    scene = int(rng.integers(image_palette)) if image_palette else None
    srng = np.random.default_rng([seed, 10**9 + scene]) if scene is not None else rng
    prompt_len = int(srng.integers(4, max(5, seq_len - action_dim - 4)))
    prompt = srng.integers(3, base_vocab_size - n_bins, size=prompt_len)
    actions = srng.uniform(-1, 1, size=action_dim).astype(np.float32)
    action_ids = ActionTokenizer(base_vocab_size, n_bins).encode(actions)
    ids = np.concatenate([[1], prompt, [29871], action_ids, [2]]).astype(np.int32)
    input_ids = np.full(seq_len, base_vocab_size, np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, np.int32)
    input_ids[:ids.size] = ids
    labels[ids.size - action_dim - 1:ids.size] = ids[-action_dim - 1:]
    pixels = srng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
    mask = (input_ids != base_vocab_size).astype(np.int32)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "actions": actions, "dataset_index": np.int32(int(rng.integers(num_datasets)))}


class SyntheticBatches:
    """Iterator over this process's rows [row_start, row_stop) of deterministic global batches.

    `get_state()` / `set_state()` expose the position (the next batch index) for checkpoints.
    """

    def __init__(self, global_batch: int, image_size: int, seq_len: int, seed: int = 0,
                 row_start: int = 0, row_stop: Optional[int] = None, num_datasets: int = 1,
                 action_dim: int = 7, image_palette: Optional[int] = None):
        if seq_len < action_dim + 6:
            raise ValueError(f"synthetic seq_len={seq_len} too short for a prompt plus {action_dim} actions")
        self.global_batch, self.image_size, self.seq_len = global_batch, image_size, seq_len
        self.seed, self.num_datasets, self.action_dim = seed, num_datasets, action_dim
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
        rows = [synthetic_row(self.seed, self.next_index, r, self.image_size, self.seq_len, self.action_dim,
                              self.num_datasets, image_palette=self.image_palette)
                for r in range(*self.rows)]
        self.next_index += 1
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
