"""Text tokenization for OpenVLA (OPENVLA_REFERENCE.md §2) around the action ids of `vla_jax.spec`.

- `LlamaTokenizer`: the SentencePiece Llama-2 model (`tokenizer.model` of an HF checkpoint dir),
  plus the `<PAD>` id OpenVLA appends (pad id == base vocabulary size, 32000 for Llama-2).
- Action ids (256 uniform bins over [-1, 1], the last 256 ids of the base vocabulary, 31744..31999
  for Llama-2) are `vla_jax.spec.ActionCodec`'s: the one encoder and decoder.
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
from typing import Dict, List, Sequence

import numpy as np

from vla_jax.spec import IGNORE_INDEX, ActionCodec

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


class VLATokenizer:
    """Prompt and training-sequence builder on top of a `LlamaTokenizer`.

    `max_len` is the fixed text length (BOS included, image patches not) that every training
    sequence is padded to. `codec` (vla_jax.spec.ActionCodec over this tokenizer's base vocabulary)
    turns normalized actions into ids. `action_chunk` is K, the actions per training sequence (1:
    OpenVLA; K > 1: OpenVLA-OFT's chunks, K x action_dim action ids, parallel decoding).
    """

    def __init__(self, tokenizer: LlamaTokenizer, max_len: int = 64, n_bins: int = 256,
                 action_dim: int = 7, action_chunk: int = 1):
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        if isinstance(action_chunk, bool) or int(action_chunk) != action_chunk or int(action_chunk) < 1:
            raise ValueError(f"action_chunk must be an integer >= 1, got {action_chunk!r}")
        self.action_chunk = int(action_chunk)
        # Chunks (K > 1) exist only with OFT's parallel decoding.
        self.codec = ActionCodec(action_dim=int(action_dim), n_bins=int(n_bins), base_vocab_size=tokenizer.vocab_size,
                                 chunk_size=self.action_chunk,
                                 decoding="parallel" if self.action_chunk > 1 else "autoregressive")
        self._prompt_cache: Dict[str, List[int]] = {}

    @classmethod
    def from_file(cls, model_file: str | os.PathLike, **kw) -> "VLATokenizer":
        return cls(LlamaTokenizer(model_file), **kw)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def action_dim(self) -> int:
        return self.codec.action_dim

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
        action_ids = self.codec.encode(self._action_rows(actions, len(instructions)))
        n_sup = self.codec.num_supervised  # the K x 7 action ids + EOS carry the loss
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
