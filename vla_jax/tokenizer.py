"""Text and action tokenization for OpenVLA (OPENVLA_REFERENCE.md §2-§3).

- `LlamaTokenizer`: the SentencePiece Llama-2 model (`tokenizer.model` of an HF checkpoint dir),
  plus the `<PAD>` id OpenVLA appends (pad id == base vocabulary size, 32000 for Llama-2).
- `ActionTokenizer`: 256 uniform bins over [-1, 1]; action ids are the last 256 ids of the base
  vocabulary (31744..31999 for Llama-2). Bit-exact with OpenVLA's `ActionTokenizer`.
- `VLATokenizer`: builds prompts and fixed-length training sequences directly as ids:
  `[BOS] + ids("In: What action should the robot take to {instr}?\\nOut:") + [SPACE] + a1..a7 + [EOS]`,
  padded right with PAD; labels are -100 everywhere except the 7 action ids and EOS. With
  `action_chunk=K > 1` (OpenVLA-OFT, OFT_REFERENCE.md §2) the K x 7 chunk goes in timestep-major
  (row-major [K, 7]: a_0 .. a_{7K-1}) and labels keep those 7K ids and EOS.

Why ids are built directly instead of re-tokenizing the decoded action characters (as OpenVLA
does): with the Llama-2 model, every one of the 256 action ids decodes to a single character, and
`encode(decoded)` gives `[29871, id]` (SentencePiece adds its dummy "▁" prefix); in the training
context `prompt + " " + chars` every single id and every pair of ids re-tokenizes to exactly the
same ids (tests/test_tokenizer.py checks all 256 singles and 65,536 pairs), so direct construction
gives the sequences OpenVLA trained on, without depending on that property at run time.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence

import numpy as np

IGNORE_INDEX = -100
SPACE_PIECE = "\u2581"  # SentencePiece's "▁": id 29871 in Llama-2, the space before the actions.


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt for openvla-7b (no trailing space; the instruction is lower-cased)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


class LlamaTokenizer:
    """SentencePiece Llama tokenizer with OpenVLA's `<PAD>` appended after the base vocabulary.

    Attributes: `vocab_size` (base pieces, 32000 for Llama-2), `bos_id`, `eos_id`,
    `pad_id` (= vocab_size), `space_id` (the "▁" piece, 29871 for Llama-2).
    """

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm  # local import: keeps `import vla_jax` light

        path = os.fspath(model_file)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer model file {path!r} does not exist; expected a SentencePiece "
                             f"`tokenizer.model` (e.g. the one in an HF OpenVLA checkpoint directory)")
        self.model_file = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        self.pad_id = self.vocab_size
        self.space_id = int(self.sp.piece_to_id(SPACE_PIECE))
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"tokenizer {path!r} defines no BOS/EOS (bos={self.bos_id}, eos={self.eos_id})")
        if self.space_id == self.sp.unk_id():
            raise ValueError(f"tokenizer {path!r} has no {SPACE_PIECE!r} piece; OpenVLA's sequence layout needs it")

    def encode(self, text: str) -> List[int]:
        """Text -> ids, without BOS/EOS."""
        return list(self.sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Ids outside the base vocabulary (PAD, padded embedding rows) are dropped."""
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> the last `n_bins` ids of the base vocabulary.

    Exactly OpenVLA's scheme: edges `linspace(min, max, n_bins)`, `id = vocab_size - digitize(a, edges)`
    (only a == max maps to `vocab_size - n_bins`), decode through the `n_bins - 1` bin centers with
    the index clipped to `n_bins - 2` (so the two lowest ids decode to the same value).
    """

    def __init__(self, vocab_size: int = 32000, n_bins: int = 256, min_action: float = -1.0,
                 max_action: float = 1.0):
        if vocab_size <= n_bins:
            raise ValueError(f"vocab_size={vocab_size} must exceed n_bins={n_bins}")
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.min_action, self.max_action = float(min_action), float(max_action)
        self.bins = np.linspace(min_action, max_action, n_bins)  # float64, as in the reference
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def first_id(self) -> int:
        """Smallest action id (the encoding of `max_action`): 31744 for Llama-2."""
        return self.vocab_size - self.n_bins

    @property
    def last_id(self) -> int:
        """Largest action id (the lowest bin): 31999 for Llama-2."""
        return self.vocab_size - 1

    def encode(self, actions) -> np.ndarray:
        """actions [..., D] (any float dtype) -> int32 ids [..., D] in [first_id, last_id]."""
        a = np.clip(np.asarray(actions), self.min_action, self.max_action)
        if not np.all(np.isfinite(a)):
            raise ValueError("ActionTokenizer.encode got NaN actions; normalized actions must be finite")
        return (self.vocab_size - np.digitize(a, self.bins)).astype(np.int32)

    def decode(self, ids) -> np.ndarray:
        """ids [..., D] -> float32 actions [..., D]. Non-action ids are decoded after clipping, as OpenVLA does."""
        d = self.vocab_size - np.asarray(ids, dtype=np.int64)
        idx = np.clip(d - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx].astype(np.float32)

    def is_action_id(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.first_id) & (ids <= self.last_id)


class VLATokenizer:
    """Prompt and training-sequence builder on top of a `LlamaTokenizer`.

    `max_len` is the fixed text length (BOS included, image patches not) that every training
    sequence is padded to. `action_chunk` is K, the actions per training sequence (1: OpenVLA;
    K > 1: OpenVLA-OFT's chunks, K x action_dim action ids).
    """

    def __init__(self, tokenizer: LlamaTokenizer, max_len: int = 64, n_bins: int = 256,
                 action_dim: int = 7, action_chunk: int = 1):
        self.tokenizer = tokenizer
        self.action_tokenizer = ActionTokenizer(vocab_size=tokenizer.vocab_size, n_bins=n_bins)
        self.max_len = int(max_len)
        self.action_dim = int(action_dim)
        if isinstance(action_chunk, bool) or int(action_chunk) != action_chunk or int(action_chunk) < 1:
            raise ValueError(f"action_chunk must be an integer >= 1, got {action_chunk!r}")
        self.action_chunk = int(action_chunk)
        self._prompt_cache: Dict[str, List[int]] = {}

    @classmethod
    def from_file(cls, model_file: str | os.PathLike, **kw) -> "VLATokenizer":
        return cls(LlamaTokenizer(model_file), **kw)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def prompt_ids(self, instruction: str) -> List[int]:
        """ids of `build_prompt(instruction)` without BOS (cached: instructions repeat across frames)."""
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            ids = self.tokenizer.encode(build_prompt(instruction))
            if len(self._prompt_cache) < 1_000_000:  # bounded: OXE has ~100k distinct instructions
                self._prompt_cache[instruction] = ids
        return ids

    def inference_ids(self, instruction: str) -> List[int]:
        """`[BOS] + prompt + [SPACE]`: the context the first action token is predicted from."""
        return [self.tokenizer.bos_id] + self.prompt_ids(instruction) + [self.tokenizer.space_id]

    def training_ids(self, instruction: str, action_ids) -> List[int]:
        """Unpadded `[BOS] + prompt + [SPACE] + action_ids + [EOS]`; action_ids [D] or a chunk
        [K, D], flattened row-major (timestep-major: a_0's D ids, then a_1's, ...)."""
        flat = np.asarray(action_ids).reshape(-1)
        return self.inference_ids(instruction) + [int(i) for i in flat] + [self.tokenizer.eos_id]

    def _action_rows(self, actions, b: int) -> np.ndarray:
        """actions -> [B, K * action_dim] in timestep-major order, after checking the shape.

        K = 1: [B, action_dim] only (OpenVLA). K > 1: [B, K, action_dim] or already flat
        [B, K * action_dim]."""
        a = np.asarray(actions)
        k, d = self.action_chunk, self.action_dim
        if k == 1:
            if a.ndim != 2 or a.shape[1] != d or a.shape[0] != b:
                raise ValueError(f"actions must be [B={b}, {d}], got {a.shape}")
            return a
        if a.shape == (b, k, d) or a.shape == (b, k * d):
            return a.reshape(b, k * d)
        raise ValueError(f"actions for action_chunk={k} must be [B={b}, {k}, {d}] (or flat [B={b}, {k * d}]), "
                         f"got {a.shape}")

    def encode_batch(self, instructions: Sequence, actions) -> Dict[str, np.ndarray]:
        """instructions: B str/bytes; actions: normalized float [B, action_dim] (action_chunk 1), or
        [B, K, action_dim] / [B, K * action_dim] (action_chunk K > 1, timestep-major).

        Returns int32 `input_ids`, `attention_mask`, `labels`, each [B, max_len]; labels are -100
        except the K * action_dim action ids and EOS.
        Raises ValueError if a sequence does not fit `max_len` (truncating would cut the actions).
        """
        action_ids = self.action_tokenizer.encode(self._action_rows(actions, len(instructions)))
        n_sup = self.action_chunk * self.action_dim + 1  # the K x 7 action ids + EOS carry the loss
        b, length = len(instructions), self.max_len
        input_ids = np.full((b, length), self.pad_id, np.int32)
        labels = np.full((b, length), IGNORE_INDEX, np.int32)
        mask = np.zeros((b, length), np.int32)
        for i, instr in enumerate(instructions):
            if isinstance(instr, bytes):
                instr = instr.decode("utf-8")
            ids = self.training_ids(instr, action_ids[i])
            n = len(ids)
            if n > length:
                raise ValueError(f"instruction {instr!r} needs {n} text tokens but max_seq_len={length}; "
                                 f"raise max_seq_len (truncation would drop the action tokens)")
            input_ids[i, :n] = ids
            labels[i, n - n_sup:n] = ids[n - n_sup:]
            mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def decode_actions(self, ids) -> np.ndarray:
        """Generated action ids [..., 7] -> normalized float32 actions [..., 7]."""
        return self.action_tokenizer.decode(ids)
