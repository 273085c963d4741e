"""Tokenizer files of an HF OpenVLA folder: the Llama-2 SentencePiece model plus the JSON settings
the HF processor reads (`<PAD>` appended as id 32000, right padding, BOS added, max length 2048)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Union

from vla_jax.models.config import OpenVLAConfig

MODEL_FILE = "tokenizer.model"
JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json")
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
        else:
            continue
        written.append(name)
    return written
