"""The PyTorch reference wiring of OpenVLA, built from timm and transformers (test-only).

It follows OPENVLA_REFERENCE.md §1 literally: two timm ViTs whose features are the output of
their second-to-last block (no final norm, prefix tokens dropped), each tower with its own
normalization, features concatenated [DINOv2, SigLIP] on channels, the fc1/GELU/fc2/GELU/fc3
projector, the patch embeddings inserted right after BOS, and a `LlamaForCausalLM` run on
`inputs_embeds` with default (0..L-1) positions. Its state dict uses the released HF key names.
"""

from __future__ import annotations

import numpy as np
import timm.models.vision_transformer as tvit
import torch
import transformers

from vla_jax.models.config import OpenVLAConfig, ViTConfig


def timm_tower(cfg: ViTConfig) -> tvit.VisionTransformer:
    """A timm VisionTransformer with the options of the real towers and the geometry of `cfg`."""
    common = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                  num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, num_classes=0, qkv_bias=True)
    if cfg.class_token:  # DINOv2 with registers
        return tvit.VisionTransformer(**common, class_token=True, reg_tokens=cfg.num_registers,
                                      no_embed_class=True, init_values=1e-5, global_pool="token")
    return tvit.VisionTransformer(**common, class_token=False, global_pool="map")


def penultimate_features(model: tvit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Output of block depth-2, no final norm, prefix tokens dropped: `[B, N, D]`."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    for block in model.blocks[:-1]:
        x = block(x)
    return x[:, model.num_prefix_tokens:]


class TorchOpenVLA(torch.nn.Module):
    def __init__(self, cfg: OpenVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.featurizer = timm_tower(cfg.dino)
        self.fused_featurizer = timm_tower(cfg.siglip)
        d_in, d_llm = cfg.vision_dim, cfg.llama.hidden_size
        self.projector = torch.nn.ModuleDict({
            "fc1": torch.nn.Linear(d_in, 4 * d_in), "fc2": torch.nn.Linear(4 * d_in, d_llm),
            "fc3": torch.nn.Linear(d_llm, d_llm)})
        lc = cfg.llama
        self.language_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
            num_hidden_layers=lc.num_layers, num_attention_heads=lc.num_heads, num_key_value_heads=lc.kv_heads,
            rms_norm_eps=lc.rms_norm_eps, rope_theta=lc.rope_theta, max_position_embeddings=lc.max_seq_len,
            tie_word_embeddings=False, attention_bias=False, attn_implementation="eager"))

    def randomize(self, seed: int = 0) -> "TorchOpenVLA":
        """Random values for every tensor, including those timm initialises to constants
        (LayerScale 1e-5, zero biases, cls/reg tokens), so that each one matters in the comparison."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("gamma",)):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    fan_in = p.shape[-1] if p.ndim > 1 else 1
                    scale = 0.02 if p.ndim <= 1 or "embed" in name or "token" in name else fan_in ** -0.5
                    p.copy_(scale * torch.randn(p.shape, generator=g))
        return self.eval()

    def hf_state_dict(self) -> dict:
        """numpy state dict under the released OpenVLA key names (`.gamma` -> `.scale_factor`)."""
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("featurizer."):
                k = "vision_backbone." + k
                if k.endswith(".gamma"):
                    k = k[: -len("gamma")] + "scale_factor"
            elif k.startswith("fused_featurizer."):
                k = "vision_backbone." + k
            out[k] = v.detach().numpy().copy()
        return out

    def load_hf_state_dict(self, sd: dict):
        """Inverse of `hf_state_dict`: arrays/tensors under the released key names -> this module,
        strict (a missing or unexpected key raises). Returns torch's load result."""
        out = {}
        for k, v in sd.items():
            if k.startswith("vision_backbone."):
                k = k[len("vision_backbone."):]
                if k.endswith(".scale_factor"):
                    k = k[: -len("scale_factor")] + "gamma"
            out[k] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        return self.load_state_dict(out, strict=True)

    def _normalized(self, x, tower_cfg):
        mean = torch.tensor(tower_cfg.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(tower_cfg.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, pixel_values: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values uint8 `[B, S, S, 3]`, input_ids `[B, T]` -> logits `[B, T + P, V]`."""
        x = torch.from_numpy(np.asarray(pixel_values, np.float32) / 255.0).permute(0, 3, 1, 2)
        feats = torch.cat([penultimate_features(self.featurizer, self._normalized(x, self.cfg.dino)),
                           penultimate_features(self.fused_featurizer, self._normalized(x, self.cfg.siglip))], dim=2)
        p = self.projector
        patches = p["fc3"](torch.nn.functional.gelu(p["fc2"](torch.nn.functional.gelu(p["fc1"](feats)))))
        text = self.language_model.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds).logits

    @torch.no_grad()
    def greedy(self, pixel_values: np.ndarray, input_ids: torch.Tensor, num_tokens: int) -> np.ndarray:
        """Greedy decoding by recomputing the full forward at every step (no KV cache): `[B, num_tokens]`."""
        ids = input_ids
        new = []
        for _ in range(num_tokens):
            nxt = self.forward(pixel_values, ids)[:, -1].argmax(-1)
            new.append(nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return torch.stack(new, dim=1).numpy()
