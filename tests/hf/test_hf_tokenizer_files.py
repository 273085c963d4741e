"""An exported HF folder loads with `transformers.AutoTokenizer.from_pretrained` — also where neither
`sentencepiece` nor `protobuf` can be imported — and its ids equal SentencePiece's on the real Llama-2
tokenizer: OpenVLA prompts, whitespace and Unicode edge cases, and 3000 strings made of random pieces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from tests.policy.test_policy_helpers import random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "In: What action should the robot take to {}?\nOut:"
TEXTS = [
    "put the carrot on the plate", "Open the drawer", "pick up the blue cup and put it in the sink",
    "move the pot 5 cm to the left", "don't knock over the bottle!", "place the 2nd block on the 1st",
    "a   b", "a  b", "  leading spaces", " one", "trailing  ", "tab\tand\nnewline", "x\n\n  y", "",
    "Ünïcödé 漢字 🤖 emoji", "\u200bzero width", "ŋ ʃ ǂ", "    def f():\n        return 1", "12345.678e-9",
    "                                 many spaces", "ALL CAPS INSTRUCTION", "a" * 80,
]


@pytest.fixture(scope="module")
def exported(llama_tokenizer_path, tmp_path_factory):
    from vla_jax.hf.exporter import export_checkpoint

    out = tmp_path_factory.mktemp("tok") / "hf"
    files = export_checkpoint(random_checkpoint(str(llama_tokenizer_path)), str(out))
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    return out


def _random_strings(sp, n, seed=0):
    rng = np.random.default_rng(seed)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i)
                                                                          or sp.is_byte(i))]
    out = []
    for _ in range(n):
        k = rng.integers(1, 12)
        out.append("".join(pieces[j] for j in rng.integers(0, len(pieces), k)).replace("\u2581", " "))
    return out


def test_auto_tokenizer_ids_equal_sentencepiece(exported, llama_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(exported), trust_remote_code=False)
    assert tok.pad_token == "<PAD>" and tok.pad_token_id == 32000 and tok.padding_side == "right"
    texts = [PROMPT.format(t.lower()) for t in TEXTS] + TEXTS + _random_strings(sp, 3000)
    mismatches = [(t, tok(t).input_ids, [1] + sp.encode(t)) for t in texts if tok(t).input_ids != [1] + sp.encode(t)]
    assert not mismatches, mismatches[:3]
    ids = [1] + sp.encode(PROMPT.format("put the carrot on the plate"))
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)
    # As with the released tokenizer, the literal special strings are parsed as special tokens.
    assert tok("<PAD></s>", add_special_tokens=False).input_ids == [32000, 2]


def test_loads_without_sentencepiece_and_protobuf(exported, llama_tokenizer_path):
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    script = ("import sys, json\n"
              "for m in ('sentencepiece', 'google.protobuf'):\n"
              "    sys.modules[m] = None  # importing them now fails\n"
              "import transformers\n"
              f"tok = transformers.AutoTokenizer.from_pretrained({str(exported)!r}, trust_remote_code=False)\n"
              "print(json.dumps([tok(t).input_ids for t in json.loads(sys.argv[1])]))\n")
    texts = [PROMPT.format(t.lower()) for t in TEXTS[:6]]
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(texts)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[1] + sp.encode(t) for t in texts]
