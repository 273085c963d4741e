"""Tokenizer: prompt ids from the real Llama-2 SentencePiece model, OpenVLA's action bins, and the
training-sequence layout. Truth: the ids published with the tokenizer's original (the project's shared data README) and the reference's
formulas (OPENVLA_REFERENCE.md §2-§3), written out here independently of vla_jax."""

import numpy as np
import pytest
import sentencepiece as spm

from vla_jax.spec import ActionCodec
from vla_jax.tokenizer import LlamaTokenizer, VLATokenizer, build_prompt

SPOON_PREFIX = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13,
                3744, 29901, 29871]


@pytest.fixture(scope="module")
def tok(llama_tokenizer_path):
    return VLATokenizer.from_file(llama_tokenizer_path, max_len=40)


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.model")):
        LlamaTokenizer(tmp_path)


def test_llama_special_ids(tok):
    t = tok.tokenizer
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.space_id) == (32000, 1, 2, 32000, 29871)


def test_prompt_ids_match_reference(tok):
    assert build_prompt("Pick up the spoon") == "In: What action should the robot take to pick up the spoon?\nOut:"
    assert tok.inference_ids("pick up the spoon") == SPOON_PREFIX
    assert tok.inference_ids("PICK UP THE SPOON") == SPOON_PREFIX  # lower-cased like OpenVLA
    ids = tok.training_ids("pick up the spoon", [31872] * 7)
    assert ids == SPOON_PREFIX + [31872] * 7 + [2]


def test_action_tokenizer_reference_points(tok):
    at = tok.codec
    assert (at.first_id, at.last_id) == (31744, 31999)
    assert at.encode(np.array([0.0, 1.0, -1.0])).tolist() == [31872, 31744, 31999]
    assert at.encode(np.array([0.0, 1.0, -1.0])).dtype == np.int32
    dec = at.decode(np.array([31744, 31745, 31999, 31872]))
    assert dec.dtype == np.float64  # float64 bin centres, as OpenVLA's numpy decode
    assert round(float(dec[0]), 5) == 0.99608 and round(float(dec[1]), 5) == 0.99608
    assert round(float(dec[2]), 5) == -0.99608
    assert float(dec[3]) == 0.0


def test_action_tokenizer_bit_exact_with_reference_formula():
    """Reference §3 written out: edges linspace(-1,1,256), id = 32000 - digitize(clip(a)),
    decode = centers[clip(32000 - id - 1, 0, 254)], centers c_i = -1 + (2i+1)/255."""
    at = ActionCodec(base_vocab_size=32000)
    rng = np.random.default_rng(0)
    edges = -1.0 + 2.0 * np.arange(256) / 255.0
    a = np.concatenate([rng.uniform(-1.3, 1.3, 20000), edges, np.nextafter(edges, 2), np.nextafter(edges, -2),
                        [-1.0, 1.0, 0.0]]).astype(np.float32)
    ref_ids = np.empty(a.shape, np.int64)
    for i, x in enumerate(np.clip(a.astype(np.float64), -1, 1)):
        ref_ids[i] = 32000 - int(np.searchsorted(np.linspace(-1, 1, 256), x, side="right"))
    assert np.array_equal(at.encode(a), ref_ids)
    assert int((ref_ids == 31744).sum()) == int((a >= 1.0).sum())  # only a == 1 (after clip) is the top id
    ids = np.arange(31700, 32064)  # action ids plus non-action ids on both sides (decoded after clipping)
    idx = np.clip(32000 - ids - 1, 0, 254)
    ref = -1.0 + (2 * idx + 1) / 255.0
    np.testing.assert_allclose(at.decode(ids), ref, rtol=0, atol=1e-7)
    edges = np.linspace(-1.0, 1.0, 256)  # upstream's bins and centres, bit for bit
    assert np.array_equal(at.decode(ids), ((edges[:-1] + edges[1:]) / 2.0)[idx])
    with pytest.raises(ValueError, match="NaN"):
        at.encode(np.array([0.1, np.nan]))


def test_training_batch_layout(tok):
    actions = np.array([[0.0, 1.0, -1.0, 0.5, -0.5, 0.25, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0]], np.float32)
    out = tok.encode_batch(["pick up the spoon", b"Put the carrot on the plate."], actions)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for v in out.values():
        assert v.shape == (2, 40) and v.dtype == np.int32
    ids, labels, mask = out["input_ids"], out["labels"], out["attention_mask"]
    act = tok.codec.encode(actions)
    for r, instr in enumerate(["pick up the spoon", "Put the carrot on the plate."]):
        expect = ([1] + spm.SentencePieceProcessor(model_file=tok.tokenizer.model_file).encode(
            f"In: What action should the robot take to {instr.lower()}?\nOut:") + [29871] + act[r].tolist() + [2])
        n = len(expect)
        assert ids[r, :n].tolist() == expect
        assert (ids[r, n:] == 32000).all()
        assert mask[r].tolist() == [1] * n + [0] * (40 - n)
        assert labels[r, n - 8:n].tolist() == act[r].tolist() + [2]
        assert (labels[r, : n - 8] == -100).all() and (labels[r, n:] == -100).all()
    assert ids[0, :20].tolist() == SPOON_PREFIX
    with pytest.raises(ValueError, match="max_seq_len"):
        tok.encode_batch(["word " * 40], actions[:1])
    with pytest.raises(ValueError, match=r"\[B=1, 7\]"):
        tok.encode_batch(["x"], actions[:, :6][:1])


def test_every_action_id_round_trips_through_the_text_tokenizer(tok):
    """What the tokenizer does with the decoded text of the 256 action ids (OpenVLA re-tokenizes
    it; we build ids directly, so this documents that both give the same sequences):
    - each id decodes to exactly one character (CJK/Hangul/Latin letters, symbols, and one
      invisible format character: 31881 -> U+202D);
    - SentencePiece encodes that character alone as [29871 ('▁' dummy prefix), id];
    - inside the training text `prompt + " " + chars`, every single id and every ordered pair of
      ids re-tokenizes to `prompt_ids + [29871] + ids`: no merges with the space or each other
      (pairs suffice: BPE can only build longer pieces through pair merges)."""
    sp = tok.tokenizer.sp
    ids = list(range(31744, 32000))
    chars = {i: sp.decode([i]) for i in ids}
    assert all(len(c) == 1 for c in chars.values())
    assert chars[31881] == "\u202d"
    assert all(sp.encode(chars[i]) == [29871, i] for i in ids)
    prompt = build_prompt("pick up the spoon")
    for i in ids:
        assert sp.encode(prompt + " " + chars[i]) == SPOON_PREFIX[1:] + [i]
    bad = 0
    for a in ids:
        enc = sp.encode([chars[a] + chars[b] for b in ids])
        bad += sum(e != [29871, a, b] for e, b in zip(enc, ids))
    assert bad == 0
    seven = [31744, 31881, 31999, 31872, 31800, 31745, 31900]
    assert sp.encode(prompt + " " + sp.decode(seven)) == SPOON_PREFIX[1:] + seven


def test_smaller_tokenizer_derives_action_range(tmp_path):
    """A demo-sized SentencePiece model: actions are its last 256 ids, PAD is its size."""
    text = ["in: what action should the robot take to pick up the red block?", "out: move the arm left",
            "put the carrot on the plate", "open the drawer and close the door"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "small"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    small = VLATokenizer(LlamaTokenizer(tmp_path / "small.model"), max_len=96)
    v = small.tokenizer.vocab_size
    assert v == 400 and small.pad_id == 400
    at = small.codec
    assert (at.first_id, at.last_id) == (v - 256, v - 1)
    assert at.encode(np.array([1.0, 0.0, -1.0])).tolist() == [v - 256, v - 128, v - 1]
    out = small.encode_batch(["pick up the red block"], np.zeros((1, 7), np.float32))
    row = out["input_ids"][0][out["attention_mask"][0] == 1].tolist()
    assert row[0] == 1 and row[-1] == 2 and row[-9] == small.tokenizer.space_id
    assert row[-8:-1] == [v - 128] * 7


def test_direct_ids_equal_openvla_text_route_through_hf_tokenizer(llama_tokenizer_path, tok):
    """OpenVLA builds the text `In: ...?\\nOut: ` + decoded action chars + `</s>` and tokenizes it
    with the HF Llama tokenizer (BOS added, `</s>` parsed as EOS). The transformers tokenizer built
    from the same tokenizer.model gives exactly our directly built ids, for every action id."""
    from transformers import LlamaTokenizer as HFLlamaTokenizer

    hf = HFLlamaTokenizer.from_pretrained(str(llama_tokenizer_path.parent), legacy=True)
    rng = np.random.default_rng(0)
    for instr in ["pick up the spoon", "Put the Carrot on the plate.", "open the drawer"]:
        for i in range(31744, 32000, 7):
            ids = [i] + rng.integers(31744, 32000, 6).tolist()
            text = build_prompt(instr) + " " + hf.decode(ids) + "</s>"
            hf_ids = hf(text, add_special_tokens=False).input_ids
            assert [1] + hf_ids == tok.training_ids(instr, ids)
