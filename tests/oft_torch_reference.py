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
Several cameras and proprio (§7): each image through both towers, the per-image features concatenated
on the sequence axis and then through the shared projector, then one proprio token from upstream's
`ProprioProjector` (fc1 -> GELU -> fc2) appended after the patches, all spliced in after BOS.
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


class TorchProprioProjector(torch.nn.Module):
    """Upstream's `ProprioProjector(llm_dim, proprio_dim)`: fc1 (P -> H) -> GELU (exact) -> fc2 (H -> H)."""

    def __init__(self, proprio_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(proprio_dim, llm_dim, bias=True)
        self.act_fn1 = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(llm_dim, llm_dim, bias=True)

    def forward(self, proprio):
        return self.fc2(self.act_fn1(self.fc1(proprio)))

    def randomize(self, seed: int) -> "TorchProprioProjector":
        """Non-zero biases too, so that each one matters."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                scale = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
        return self.eval()


def proprio_params(proj: TorchProprioProjector) -> dict:
    """torch state dict -> the Flax params of `vla_jax.models.proprio.ProprioProjector` (numpy)."""
    sd = {k: v.detach().numpy().copy() for k, v in proj.state_dict().items()}
    return {f: {"kernel": sd[f"{f}.weight"].T.copy(), "bias": sd[f"{f}.bias"]} for f in ("fc1", "fc2")}


def camera_images(pixel_values) -> list:
    """uint8 [B, S, S, 3] (one camera) or [B, N, S, S, 3] -> N arrays [B, S, S, 3], primary first."""
    x = np.asarray(pixel_values)
    return [x] if x.ndim == 4 else [x[:, i] for i in range(x.shape[1])]


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

    def __init__(self, base: TorchOpenVLA, chunk_size: int, action_dim: int, head: TorchMLPResNet = None,
                 proprio_projector: TorchProprioProjector = None, film: "TorchFiLM" = None):
        self.base, self.k, self.d, self.head = base, chunk_size, action_dim, head
        self.proprio_projector, self.film = proprio_projector, film
        base.language_model.set_attn_implementation("sdpa")

    def _patches(self, pixel_values, proprio=None, lang=None):
        """-> the embeddings spliced in after BOS [B, N * P (+ 1), H]: every camera's tower features
        concatenated on the sequence axis, the shared projector, then the proprio token if given.
        With FiLM, every camera's towers are modulated by the same language vector lang [B, H]."""
        b = self.base
        feats = []
        for image in camera_images(pixel_values):
            x = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(0, 3, 1, 2)
            xd, xs = b._normalized(x, b.cfg.dino), b._normalized(x, b.cfg.siglip)
            if self.film is None:
                parts = [penultimate_features(b.featurizer, xd), penultimate_features(b.fused_featurizer, xs)]
            else:
                parts = [self.film.penultimate_features(b.featurizer, self.film.featurizer, xd, lang),
                         self.film.penultimate_features(b.fused_featurizer, self.film.fused_featurizer, xs, lang)]
            feats.append(torch.cat(parts, dim=2))
        feats = torch.cat(feats, dim=1)
        p = b.projector
        gelu = torch.nn.functional.gelu
        out = p["fc3"](gelu(p["fc2"](gelu(p["fc1"](feats)))))
        if proprio is None:
            return out
        token = self.proprio_projector(torch.from_numpy(np.asarray(proprio, np.float32)))
        return torch.cat([out, token[:, None, :]], dim=1)

    def num_inserted(self, pixel_values, proprio=None) -> int:
        return len(camera_images(pixel_values)) * self.base.cfg.num_patches + int(proprio is not None)

    @torch.no_grad()
    def causal_logits(self, pixel_values, input_ids, proprio=None):
        """OpenVLA's autoregressive forward with the same inserted embeddings: logits [B, T + I, V] of
        `[BOS][patches of every camera][proprio]?[text]` under the default causal mask."""
        lm = self.base.language_model
        text = lm.get_input_embeddings()(torch.as_tensor(input_ids).long())
        embeds = torch.cat([text[:, :1], self._patches(pixel_values, proprio), text[:, 1:]], dim=1)
        return lm(inputs_embeds=embeds).logits

    @torch.no_grad()
    def causal_greedy(self, pixel_values, input_ids, num_tokens: int, proprio=None) -> np.ndarray:
        """Greedy decoding by recomputing the causal forward at every step (no cache): [B, num_tokens]."""
        ids = torch.as_tensor(input_ids).long()
        new = []
        for _ in range(num_tokens):
            nxt = self.causal_logits(pixel_values, ids, proprio)[:, -1].argmax(-1)
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return torch.stack(new, dim=1).numpy()

    @torch.no_grad()
    def last_hidden(self, pixel_values, input_ids, attention_mask, prompt_lengths: List[int], causal: bool = False,
                    proprio=None):
        """-> post-norm hidden states [B, T + I, H] of the whole fused sequence. causal=True runs the
        stock causal + padding mask instead (what a port without the fork's patch computes)."""
        lm = self.base.language_model
        ids = torch.as_tensor(input_ids)
        a = self.k * self.d
        actions = torch.zeros(ids.shape, dtype=torch.bool)
        for row, n in enumerate(prompt_lengths):
            actions[row, n:n + a] = True
        text = lm.get_input_embeddings()(ids) * (~actions)[..., None].to(torch.float32)
        lang = None
        if self.film is not None:  # non-action, non-pad positions of the raw embeddings
            lang = film_language_vector(lm, ids, (~actions) & torch.as_tensor(attention_mask).bool())
        patches = self._patches(pixel_values, proprio, lang)
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

    def readout(self, hidden, prompt_lengths: List[int], extra: int = 0, inserted: int = None):
        """[B, S, H] -> [B, A + extra, H]: the states of [SPACE, a_0, ...] (upstream's slice, which starts
        at NUM_PATCHES + NUM_PROMPT_TOKENS; NUM_PATCHES = `inserted`, default one image's patches)."""
        p = self.base.cfg.num_patches if inserted is None else inserted
        a = self.k * self.d + extra
        return torch.stack([hidden[row, p + n - 1:p + n - 1 + a] for row, n in enumerate(prompt_lengths)])

    @torch.no_grad()
    def logits(self, pixel_values, input_ids, attention_mask, prompt_lengths, causal: bool = False, proprio=None):
        """lm_head at the A + 1 readout positions: [B, A + 1, V] (row A predicts </s>)."""
        hidden = self.last_hidden(pixel_values, input_ids, attention_mask, prompt_lengths, causal, proprio)
        return self.base.language_model.lm_head(
            self.readout(hidden, prompt_lengths, extra=1, inserted=self.num_inserted(pixel_values, proprio)))

    @torch.no_grad()
    def chunk_tokens(self, pixel_values, input_ids, attention_mask, prompt_lengths, proprio=None):
        """argmax over the full vocabulary at the A readouts -> [B, K, D] token ids."""
        logits = self.logits(pixel_values, input_ids, attention_mask, prompt_lengths, proprio=proprio)[:, :self.k * self.d]
        return logits.argmax(-1).reshape(-1, self.k, self.d).numpy()

    @torch.no_grad()
    def l1_actions(self, pixel_values, input_ids, attention_mask, prompt_lengths, proprio=None):
        """The MLPResNet on the A readouts reshaped to (B, K, D * H) -> [B, K, D]."""
        hidden = self.readout(self.last_hidden(pixel_values, input_ids, attention_mask, prompt_lengths, proprio=proprio),
                              prompt_lengths, inserted=self.num_inserted(pixel_values, proprio))
        return self.head(hidden.reshape(hidden.shape[0], self.k, -1)).numpy()


# ----------------------------------------------------------------------------------------------
# OFT+'s FiLM (OFT_REFERENCE.md §8), written from the reference's description


class TorchFiLM(torch.nn.Module):
    """One `scale` and one `shift` Linear(H -> D_vit) (with bias) per block of each tower (every block,
    the last one included, as upstream wraps them all). `featurizer` = DINOv2, `fused_featurizer` = SigLIP.

    `mode` picks the block wiring: 'upstream' (x += attn; x = x * (1 + gamma) + beta; x += mlp) or, for
    mutation checks, 'no_one' (x * gamma + beta) and 'after_mlp' (the modulation after the MLP)."""

    MODES = ("upstream", "no_one", "after_mlp")

    def __init__(self, cfg, mode: str = "upstream"):
        super().__init__()
        assert mode in self.MODES
        self.mode = mode
        h = cfg.llama.hidden_size

        def pairs(tower):
            return torch.nn.ModuleList([torch.nn.ModuleDict({"scale": torch.nn.Linear(h, tower.width),
                                                             "shift": torch.nn.Linear(h, tower.width)})
                                        for _ in range(tower.depth)])

        self.featurizer, self.fused_featurizer = pairs(cfg.dino), pairs(cfg.siglip)

    def randomize(self, seed: int) -> "TorchFiLM":
        """Weights ~ 0.5 / sqrt(H) and biases ~ 0.1 normal: gamma and beta large enough to matter."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                scale = 0.1 if p.ndim == 1 else 0.5 * p.shape[-1] ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
        return self.eval()

    def block(self, block, pair, x, lang):
        gamma = pair["scale"](lang)[:, None, :]
        beta = pair["shift"](lang)[:, None, :]
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        if self.mode == "after_mlp":
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        x = x * gamma + beta if self.mode == "no_one" else x * (1 + gamma) + beta
        if self.mode != "after_mlp":
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x

    def penultimate_features(self, vit, pairs, x, lang):
        """`penultimate_features` with every block that runs (0..depth-2) FiLM-wrapped: [B, N, D]."""
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block, pair in zip(list(vit.blocks)[:-1], list(pairs)[:-1]):
            x = self.block(block, pair, x, lang)
        return x[:, vit.num_prefix_tokens:]


def film_params(film: TorchFiLM) -> dict:
    """torch FiLM -> params['film'] of `vla_jax.models.film` (numpy): blocks 0..L-2 stacked, the last apart."""
    def linear(m):
        return {"kernel": m.weight.detach().numpy().T.copy(), "bias": m.bias.detach().numpy().copy()}

    def tower(pairs):
        per = [{n: linear(p[n]) for n in ("scale", "shift")} for p in pairs]
        stacked = {n: {k: np.stack([b[n][k] for b in per[:-1]]) for k in ("kernel", "bias")}
                   for n in ("scale", "shift")}
        return {"blocks": stacked, "last_block": per[-1]}

    return {"dino": tower(film.featurizer), "siglip": tower(film.fused_featurizer)}


def film_language_vector(lm, input_ids, keep) -> torch.Tensor:
    """The mean of the raw embedding lookups of `input_ids` [B, T] over the positions where keep [B, T]."""
    raw = lm.get_input_embeddings()(torch.as_tensor(input_ids).long())
    keep = torch.as_tensor(np.asarray(keep)).to(torch.float32)[..., None]
    return (raw * keep).sum(1) / keep.sum(1)
