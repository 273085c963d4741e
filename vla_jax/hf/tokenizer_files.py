"""Tokenizer files of an HF OpenVLA folder: the Llama-2 SentencePiece model, the JSON settings the HF
processor reads (`<PAD>` appended as id 32000, right padding, BOS added, max length 2048), and
`tokenizer.json`, so that `AutoTokenizer.from_pretrained(folder)` loads without converting the
SentencePiece model (a conversion that needs the `protobuf` package and takes seconds).

tokenizer.json (the `tokenizers` library's format) is derived from the SentencePiece model here: its
vocabulary (ids as in the model), BPE merges = every split of a piece into two pieces, ranked by the
merged piece's score as SentencePiece ranks them (higher first; ties by id, then by the left part's
length), byte fallback for characters outside the vocabulary, and a normalizer that always prepends
"▁" and turns spaces into "▁" (SentencePiece's dummy prefix, also for text that starts with a space).
A test checks its ids against SentencePiece on the real Llama-2 model. As in HF, the literal strings
`<s>`, `</s>`, `<unk>` and `<PAD>` in text are read as those special tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Union

from vla_jax.models.config import OpenVLAConfig

MODEL_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", TOKENIZER_JSON)
PAD_TOKEN = "<PAD>"


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def tokenizer_jsons(cfg: OpenVLAConfig, model_max_length: int) -> dict:
    """{file name: JSON object} for a LlamaTokenizer with OpenVLA's `<PAD>`."""
    specials = {"0": _special("<unk>"), str(cfg.bos_token_id): _special("<s>"), str(cfg.eos_token_id): _special("</s>"),
                str(cfg.pad_token_id): _special(PAD_TOKEN)}
    return {
        "tokenizer_config.json": {
            "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": specials,
            "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"}, "bos_token": "<s>",
            "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
            "model_max_length": model_max_length, "pad_token": PAD_TOKEN, "padding_side": "right",
            "processor_class": "PrismaticProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": False},
        "special_tokens_map.json": {"bos_token": _special("<s>"), "eos_token": _special("</s>"),
                                    "pad_token": _special(PAD_TOKEN), "unk_token": _special("<unk>")},
        "added_tokens.json": {PAD_TOKEN: cfg.pad_token_id},
    }


def tokenizer_json(model_path: str, cfg: OpenVLAConfig) -> dict:
    """tokenizer.json for the SentencePiece BPE model at `model_path` plus OpenVLA's `<PAD>` (see the
    module docstring)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    ranked = []
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            if piece[:k] in vocab and piece[k:] in vocab:
                ranked.append((-sp.get_score(i), i, k))
    ranked.sort()
    merges = [[sp.id_to_piece(i)[:k], sp.id_to_piece(i)[k:]] for _, i, k in ranked]
    if not any(" " in a or " " in b for a, b in merges):  # "a b" strings: also read by tokenizers < 0.20
        merges = [f"{a} {b}" for a, b in merges]
    specials = [(sp.unk_id(), sp.id_to_piece(sp.unk_id())), (cfg.bos_token_id, sp.id_to_piece(cfg.bos_token_id)),
                (cfg.eos_token_id, sp.id_to_piece(cfg.eos_token_id)), (cfg.pad_token_id, PAD_TOKEN)]
    bos = sp.id_to_piece(cfg.bos_token_id)
    seq = lambda name, type_id: {"Sequence": {"id": name, "type_id": type_id}}  # noqa: E731
    special = lambda type_id: {"SpecialToken": {"id": bos, "type_id": type_id}}  # noqa: E731
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in specials],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [special(0), seq("A", 0)],
                           "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                           "special_tokens": {bos: {"id": bos, "ids": [cfg.bos_token_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()),
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def _check_model(path: str, cfg: OpenVLAConfig) -> None:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"tokenizer {path} is not a SentencePiece model: {e}") from None
    if sp.get_piece_size() != cfg.base_vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.get_piece_size()} pieces but the model's base vocabulary is "
                         f"{cfg.base_vocab_size} (action ids are its last {cfg.n_action_bins} ids)")


def write_tokenizer_files(out_dir: str, source: Union[str, bytes], cfg: OpenVLAConfig,
                          model_max_length: Optional[int] = None) -> list:
    """Writes tokenizer.model (copied from a file, a folder holding one, or raw bytes) and the JSON
    settings (copied when `source` is a folder that has them, generated otherwise). Returns the names."""
    dst = os.path.join(out_dir, MODEL_FILE)
    src_dir = None
    if isinstance(source, bytes):
        with open(dst, "wb") as f:
            f.write(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            src_dir, path = path, os.path.join(path, MODEL_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer {path} does not exist; pass a SentencePiece tokenizer.model or a folder "
                             f"holding one")
        shutil.copyfile(path, dst)
    _check_model(dst, cfg)
    written = [MODEL_FILE]
    generated = tokenizer_jsons(cfg, model_max_length or cfg.llama.max_seq_len - cfg.num_patches)
    for name in JSON_FILES:
        if src_dir is not None and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
        elif name in generated:
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(generated[name], f, indent=2)
        elif name == TOKENIZER_JSON:
            with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
                json.dump(tokenizer_json(dst, cfg), f, ensure_ascii=False)
        else:
            continue
        written.append(name)
    return written
