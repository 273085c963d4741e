"""`predict_action(..., stop_at_eos=True)` reproduces OpenVLA's result when EOS comes early: HF `generate`
stops at EOS and the last 7 ids of the whole sequence (prompt included) are decoded. The default keeps
decoding the 7 generated positions.

Weights are crafted so the model emits EOS at step 3 whatever the image: every attention and MLP output
projection is zero, so the last hidden state is the current token's embedding and the LM is a bigram
table: 29871 -> A1 -> A2 -> EOS. The truth is transformers' own `generate` on those weights."""

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tests.policy.test_policy_helpers import model_config, openvla_unnormalize, random_images, stats_entry
from tests.torch_reference import TorchOpenVLA

A1, A2, EOS, SPACE = 31800, 31950, 2, 29871
INSTRUCTIONS = ["put the carrot on the plate", "Open the drawer"]


@pytest.fixture(scope="module")
def crafted(llama_tokenizer_path):
    from vla_jax.hf import keys_openvla
    from vla_jax.policy import Policy
    from vla_jax.tokenizer import VLATokenizer

    cfg = model_config()
    ref = TorchOpenVLA(cfg).randomize(seed=4)
    lm = ref.language_model
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        lm.model.norm.weight.fill_(1.0)
        emb, head = lm.model.embed_tokens.weight, lm.lm_head.weight  # [V, D] both
        for dim, token in enumerate((SPACE, A1, A2)):
            emb[token] = 0.0
            emb[token, dim] = 1.0
        head.zero_()
        for dim, nxt in enumerate((A1, A2, EOS)):
            head[nxt, dim] = 5.0
    params = keys_openvla.hf_to_params(ref.hf_state_dict(), cfg)
    tok = VLATokenizer.from_file(str(llama_tokenizer_path))
    policy = Policy(cfg, params, tok, {"bridge_orig": stats_entry(0.02)}, batch_buckets=(2,))
    return policy, lm


def _reference_ids(lm, sp, instruction):
    prompt = [1] + sp.encode(f"In: What action should the robot take to {instruction.lower()}?\nOut:") + [SPACE]
    out = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=7, do_sample=False, eos_token_id=EOS, pad_token_id=32000)
    return prompt, out[0].numpy()


def test_early_eos_matches_upstream_generate_only_with_stop_at_eos(crafted, llama_tokenizer_path):
    policy, lm = crafted
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))
    images = random_images(2, seed=3)
    entry = policy.norm_stats["bridge_orig"]
    ours = policy.predict_tokens(images, INSTRUCTIONS)
    parity = policy.predict_tokens(images, INSTRUCTIONS, stop_at_eos=True)
    for row, instruction in enumerate(INSTRUCTIONS):
        prompt, seq = _reference_ids(lm, sp, instruction)
        assert seq.tolist() == prompt + [A1, A2, EOS]  # generate stopped at EOS, 3 tokens in
        upstream = seq[-7:]  # what upstream decodes: 4 prompt ids, A1, A2, EOS
        np.testing.assert_array_equal(parity[row], upstream)
        assert ours[row, :3].tolist() == [A1, A2, EOS] and ours.shape == (2, 7)  # default: 7 generated positions
        np.testing.assert_array_equal(
            policy.predict_action(images[row], instruction, stop_at_eos=True), openvla_unnormalize(upstream, entry))
        np.testing.assert_array_equal(policy.predict_action(images[row], instruction),
                                      openvla_unnormalize(ours[row], entry))
    assert not np.array_equal(openvla_unnormalize(ours[0], entry), openvla_unnormalize(parity[0], entry))


def test_without_early_eos_both_modes_agree():
    from vla_jax.policy import upstream_eos_ids

    prompt = [1, 512, 29901, 29871]
    tokens = np.array([31800, 31801, 31802, 31803, 31804, 31805, 2], np.int32)  # EOS only as the 7th token
    np.testing.assert_array_equal(upstream_eos_ids(prompt, tokens, 2), tokens)
    np.testing.assert_array_equal(upstream_eos_ids(prompt, tokens[:6], 2), tokens[:6])
    first = np.array([2, 31801, 31802, 31803, 31804, 31805, 31806], np.int32)  # EOS first: the last 6 prompt ids + EOS
    np.testing.assert_array_equal(upstream_eos_ids(list(range(10, 20)), first, 2), [14, 15, 16, 17, 18, 19, 2])
