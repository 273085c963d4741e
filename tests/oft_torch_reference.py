"""The PyTorch reference wiring of OpenVLA-OFT's parallel decoding (test-only).

Built literally from OFT_REFERENCE.md §2-§6 on top of `TorchOpenVLA` (timm towers, projector,
transformers' Llama), independently of the JAX code:
  * each row is `[BOS] prompt SPACE`, A placeholder ids, `</s>`, right padding; the input embeddings
    of the A action slots are multiplied by zero (upstream's `input_embeddings * ~all_actions_mask`);
  * the patches are spliced in after BOS;
  * the Llama runs through SDPA with the OFT fork's mask: HF's causal + padding 4-D mask whose LAST
    query row is copied to every row (0 on every real key, the dtype minimum on pad keys), i.e.
    bidirectional attention with a key-padding mask; positions are the default arange;
  * readout: `last_hidden_state` (after the final norm) at [P + n_b - 1, P + n_b - 1 + A) for a
    prompt of n_b tokens (BOS and SPACE included): the states of [SPACE, a_0 .. a_{A-2}];
  * the L1 head: upstream's MLPResNet (LN -> Linear -> ReLU -> 2 x [x + ReLU(Linear(LN(x)))] -> LN
    -> Linear) on the states reshaped row-major to (B, K, D * H).
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from tests.torch_reference import TorchOpenVLA, penultimate_features


class TorchMLPResNetBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.ReLU())

    def forward(self, x):
        return x + self.ffn(x)


class TorchMLPResNet(torch.nn.Module):
    """Upstream's `MLPResNet(num_blocks, input_dim, hidden_dim, output_dim)` layer order and key names."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = torch.nn.LayerNorm(input_dim)
        self.fc1 = torch.nn.Linear(input_dim, hidden_dim)
        self.relu = torch.nn.ReLU()
        self.mlp_resnet_blocks = torch.nn.ModuleList([TorchMLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = torch.nn.LayerNorm(hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        x = self.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))

    def randomize(self, seed: int) -> "TorchMLPResNet":
        """Random LayerNorm weights/biases too (torch initialises them to 1/0), so each one matters."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:
                    base = 1.0 if ("layer_norm" in name or ".0." in name) and name.endswith("weight") else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        return self.eval()


def head_params(head: TorchMLPResNet) -> dict:
    """torch state dict -> the Flax params of `vla_jax.models.action_head.L1ActionHead` (numpy)."""
    sd = {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}

    def ln(prefix):
        return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}

    def linear(prefix):
        return {"kernel": sd[prefix + ".weight"].T.copy(), "bias": sd[prefix + ".bias"]}

    out = {"layer_norm1": ln("layer_norm1"), "fc1": linear("fc1"), "layer_norm2": ln("layer_norm2"),
           "fc2": linear("fc2")}
    for i in range(len(head.mlp_resnet_blocks)):
        out[f"mlp_resnet_blocks_{i}"] = {"layer_norm": ln(f"mlp_resnet_blocks.{i}.ffn.0"),
                                         "fc": linear(f"mlp_resnet_blocks.{i}.ffn.1")}
    return out


def oft_rows(prompts: Sequence[Sequence[int]], num_slots: int, eos_id: int, pad_id: int, placeholder: int = 1):
    """-> (input_ids [B, T], attention_mask [B, T], prompt lengths) as upstream's
    `_prepare_input_for_action_prediction` builds one row, right-padded to the longest row."""
    rows = [list(p) + [placeholder] * num_slots + [eos_id] for p in prompts]
    t = max(len(r) for r in rows)
    ids = np.array([r + [pad_id] * (t - len(r)) for r in rows], np.int64)
    mask = np.array([[1] * len(r) + [0] * (t - len(r)) for r in rows], np.int64)
    return ids, mask, [len(p) for p in prompts]


class TorchOFT:
    """OFT parallel decoding over a `TorchOpenVLA` (its weights, SDPA attention)."""

    def __init__(self, base: TorchOpenVLA, chunk_size: int, action_dim: int, head: TorchMLPResNet = None):
        self.base, self.k, self.d, self.head = base, chunk_size, action_dim, head
        base.language_model.set_attn_implementation("sdpa")

    def _patches(self, pixel_values):
        b = self.base
        x = torch.from_numpy(np.asarray(pixel_values, np.float32) / 255.0).permute(0, 3, 1, 2)
        feats = torch.cat([penultimate_features(b.featurizer, b._normalized(x, b.cfg.dino)),
                           penultimate_features(b.fused_featurizer, b._normalized(x, b.cfg.siglip))], dim=2)
        p = b.projector
        gelu = torch.nn.functional.gelu
        return p["fc3"](gelu(p["fc2"](gelu(p["fc1"](feats)))))

    @torch.no_grad()
    def last_hidden(self, pixel_values, input_ids, attention_mask, prompt_lengths: List[int], causal: bool = False):
        """-> post-norm hidden states [B, T + P, H] of the whole fused sequence. causal=True runs the
        stock causal + padding mask instead (what a port without the fork's patch computes)."""
        lm = self.base.language_model
        ids = torch.as_tensor(input_ids)
        a = self.k * self.d
        actions = torch.zeros(ids.shape, dtype=torch.bool)
        for row, n in enumerate(prompt_lengths):
            actions[row, n:n + a] = True
        text = lm.get_input_embeddings()(ids) * (~actions)[..., None].to(torch.float32)
        patches = self._patches(pixel_values)
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        bsz, s = embeds.shape[:2]
        mask2d = torch.as_tensor(attention_mask).bool()
        mask2d = torch.cat([mask2d[:, :1], torch.ones(bsz, patches.shape[1], dtype=torch.bool), mask2d[:, 1:]], 1)
        lo = torch.finfo(torch.float32).min
        allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None] & mask2d[:, None, None, :]
        mask4d = torch.where(allowed, 0.0, lo)  # HF's causal + padding mask [B, 1, S, S]
        if not causal:
            mask4d = mask4d[:, :, -1:, :].expand(bsz, 1, s, s)  # the fork: the last row for every query
        return lm.model(inputs_embeds=embeds, attention_mask=mask4d).last_hidden_state

    def readout(self, hidden, prompt_lengths: List[int], extra: int = 0):
        """[B, S, H] -> [B, A + extra, H]: the states of [SPACE, a_0, ...] (upstream's slice)."""
        p = self.base.cfg.num_patches
        a = self.k * self.d + extra
        return torch.stack([hidden[row, p + n - 1:p + n - 1 + a] for row, n in enumerate(prompt_lengths)])

    @torch.no_grad()
    def logits(self, pixel_values, input_ids, attention_mask, prompt_lengths, causal: bool = False):
        """lm_head at the A + 1 readout positions: [B, A + 1, V] (row A predicts </s>)."""
        hidden = self.last_hidden(pixel_values, input_ids, attention_mask, prompt_lengths, causal)
        return self.base.language_model.lm_head(self.readout(hidden, prompt_lengths, extra=1))

    @torch.no_grad()
    def chunk_tokens(self, pixel_values, input_ids, attention_mask, prompt_lengths):
        """argmax over the full vocabulary at the A readouts -> [B, K, D] token ids."""
        logits = self.logits(pixel_values, input_ids, attention_mask, prompt_lengths)[:, :self.k * self.d]
        return logits.argmax(-1).reshape(-1, self.k, self.d).numpy()

    @torch.no_grad()
    def l1_actions(self, pixel_values, input_ids, attention_mask, prompt_lengths):
        """The MLPResNet on the A readouts reshaped to (B, K, D * H) -> [B, K, D]."""
        hidden = self.readout(self.last_hidden(pixel_values, input_ids, attention_mask, prompt_lengths), prompt_lengths)
        return self.head(hidden.reshape(hidden.shape[0], self.k, -1)).numpy()
