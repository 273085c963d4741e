"""Geometry configs for the OpenVLA model and its parts.

Each module takes only its own small config. Presets: `openvla-7b` (exact released geometry) and
small ones for tests and the demo. Dtypes are given as strings so configs stay hashable and
serialisable (checkpoint assets store them as JSON).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from vla_jax.models.execution import ExecutionConfig

# Names of the Llama layers' remat policies (jax.checkpoint_policies), LlamaConfig.remat_policy.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


# OpenVLAConfig.action_head values: discrete action tokens (lm_head) or OFT's continuous L1 head.
ACTION_HEADS = ("tokens", "l1")


def to_dtype(name: str):
    """'float32' / 'bfloat16' / 'float16' -> jnp dtype."""
    return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A timm-style ViT tower that returns the patch features of its second-to-last block.

    DINOv2-reg: class_token=True, num_registers=4, layer_scale=True, no_embed_class=True.
    SigLIP: class_token=False, num_registers=0, layer_scale=False, map_head=True (unused params).
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    image_size: int = 224
    patch_size: int = 14
    class_token: bool = False
    num_registers: int = 0
    layer_scale: bool = False
    no_embed_class: bool = False
    map_head: bool = False
    ln_eps: float = 1e-6
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-2 decoder geometry. `vocab_size` is the embedding/lm_head row count (32064 for OpenVLA).

    `remat_policy` (used when `remat`): what each rematerialised layer keeps for its backward,
    'nothing_saveable' (least memory, what OpenVLA's per-layer activation checkpointing does) or
    'dots_with_no_batch_dims_saveable' (keeps the weight matmuls' outputs: fewer recomputed FLOPs).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048 + 256
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = "nothing_saveable"

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclasses.dataclass(frozen=True)
class OpenVLAConfig:
    """The composed model: [DINOv2, SigLIP] -> fused projector -> Llama-2.

    `base_vocab_size` is the tokenizer's base vocabulary (32000 for Llama-2); the 256 action
    tokens are its last ids. `pad_token_id` is the id of `<PAD>` (== base_vocab_size).

    OpenVLA-OFT options (OFT_REFERENCE.md §2-§6; the defaults are the autoregressive OpenVLA):
    `parallel_decoding`: predict all `chunk_size * action_dim` action values in one bidirectional
    forward pass over zeroed action slots (`vla_jax.models.parallel`) instead of token by token.
    `chunk_size` (K): future actions predicted per observation; > 1 needs parallel_decoding.
    `action_head`: 'tokens' = the lm_head's logits, argmax over the full vocabulary, 256-bin decode;
    'l1' = the continuous MLPResNet head (`vla_jax.models.action_head`, params['action_head'],
    trained with an L1 loss); 'l1' needs parallel_decoding.
    `execution`: how the model runs on the backend (same values for every setting; `ExecutionConfig`).

    Several cameras and proprioception (OFT_REFERENCE.md §7; the defaults are OpenVLA's one image):
    `num_images` (N): camera images per example, `pixel_values` [B, N, S, S, 3] (primary first); each
    goes through the same towers and projector, their patches follow BOS in camera order.
    `proprio_dim` (P): None (or 0) = no proprio input; else `proprio` float32 [B, P] (normalized) is
    projected to one token placed after the last image's patches (`vla_jax.models.proprio`,
    params['proprio_projector']). The fused sequence is
    `[BOS] [img_0 patches] .. [img_{N-1} patches] [proprio]? [text ...]`; `num_inserted_tokens` counts
    what sits between BOS and the text.
    `film`: OFT+'s FiLM (§8, `vla_jax.models.film`): every block of both towers is modulated by
    scale/shift linears of the mean raw embedding of the prompt (params['film']); needs parallel_decoding.
    """

    dino: ViTConfig
    siglip: ViTConfig
    llama: LlamaConfig
    base_vocab_size: int = 32000
    pad_token_id: int = 32000
    bos_token_id: int = 1
    eos_token_id: int = 2
    n_action_bins: int = 256
    action_dim: int = 7
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    parallel_decoding: bool = False
    chunk_size: int = 1
    action_head: str = "tokens"
    num_images: int = 1
    proprio_dim: Optional[int] = None
    film: bool = False
    execution: ExecutionConfig = ExecutionConfig()

    @property
    def num_action_slots(self) -> int:
        """A = chunk_size * action_dim: the action positions one parallel forward predicts."""
        return self.chunk_size * self.action_dim

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def image_size(self) -> int:
        return self.dino.image_size

    @property
    def num_patches(self) -> int:
        """Patches of ONE image (256 at 224 px); see `num_inserted_tokens` for the whole prefix."""
        return self.dino.num_patches

    @property
    def num_inserted_tokens(self) -> int:
        """Embeddings spliced in between BOS and the text: num_images x num_patches image patches, plus
        the proprio token when proprio_dim is set (upstream's NUM_PATCHES). Text token t >= 1 sits at
        fused index t + num_inserted_tokens. Every sequence offset (loss positions, KV-cache prefill,
        the parallel readout) reads it from here."""
        return self.num_images * self.num_patches + int(self.proprio_dim is not None)

    def __post_init__(self):
        if self.dino.image_size != self.siglip.image_size or self.dino.num_patches != self.siglip.num_patches:
            raise ValueError(
                f"both towers must see the same image size and patch grid, got DINO "
                f"{self.dino.image_size}/{self.dino.patch_size} and SigLIP "
                f"{self.siglip.image_size}/{self.siglip.patch_size}")
        self._check_action_options()
        self._check_input_options()

    def _check_input_options(self):
        n = self.num_images
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"OpenVLAConfig.num_images must be an integer >= 1 (cameras per example), got {n!r}")
        p = self.proprio_dim
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 0):
            raise ValueError(f"OpenVLAConfig.proprio_dim must be None, 0 (no proprio input) or an integer >= 1 "
                             f"(the proprio vector's size, e.g. 8 for LIBERO), got {p!r}")
        if p == 0:  # 0 and None both mean no proprio token; one spelling in stored configs
            object.__setattr__(self, "proprio_dim", None)
        if not isinstance(self.film, bool):
            raise ValueError(f"OpenVLAConfig.film must be True or False, got {self.film!r}")
        if self.film and not self.parallel_decoding:
            raise ValueError("OpenVLAConfig.film=True (OpenVLA-OFT+'s FiLM, OFT_REFERENCE.md §8) needs "
                             "parallel_decoding=True: FiLM is an OFT+ feature, and the autoregressive decoder's "
                             "KV-cache prefill does not compute the language vector")

    def _check_action_options(self):
        if not isinstance(self.parallel_decoding, bool):
            raise ValueError(f"OpenVLAConfig.parallel_decoding must be True or False, got {self.parallel_decoding!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"OpenVLAConfig.chunk_size must be an integer >= 1 (actions per chunk), "
                             f"got {self.chunk_size!r}")
        if isinstance(self.action_dim, bool) or not isinstance(self.action_dim, int) or self.action_dim < 1:
            raise ValueError(f"OpenVLAConfig.action_dim must be an integer >= 1, got {self.action_dim!r}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"OpenVLAConfig.action_head={self.action_head!r}; expected one of {ACTION_HEADS} "
                             f"('tokens': discrete action tokens, 'l1': the continuous MLPResNet head)")
        if not self.parallel_decoding and self.chunk_size != 1:
            raise ValueError(f"OpenVLAConfig.chunk_size={self.chunk_size} needs parallel_decoding=True "
                             f"(autoregressive decoding predicts one action, chunk_size=1)")
        if not self.parallel_decoding and self.action_head != "tokens":
            raise ValueError(f"OpenVLAConfig.action_head={self.action_head!r} needs parallel_decoding=True "
                             f"(autoregressive decoding predicts action tokens, action_head='tokens')")


def with_dtypes(cfg: OpenVLAConfig, dtype: str, param_dtype: str = "float32", remat: Optional[bool] = None) -> OpenVLAConfig:
    """Returns `cfg` with compute/param dtypes (and optionally remat) set on every part."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    sub = dict(kw, **({} if remat is None else {"remat": remat}))
    return dataclasses.replace(
        cfg, dino=dataclasses.replace(cfg.dino, **sub), siglip=dataclasses.replace(cfg.siglip, **sub),
        llama=dataclasses.replace(cfg.llama, **sub), **kw)


def _dino(width, depth, heads, mlp, image_size=224, patch=14) -> ViTConfig:
    return ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, image_size=image_size,
                     patch_size=patch, class_token=True, num_registers=4, layer_scale=True,
                     no_embed_class=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _siglip(width, depth, heads, mlp, image_size=224, patch=14) -> ViTConfig:
    return ViTConfig(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, image_size=image_size,
                     patch_size=patch, map_head=True, mean=SIGLIP_MEAN, std=SIGLIP_STD)


PRESETS = {
    # Exactly the released openvla/openvla-7b geometry (7,541,237,184 parameters).
    "openvla-7b": OpenVLAConfig(
        dino=_dino(1024, 24, 16, 4096),
        siglip=_siglip(1152, 27, 16, 4304),
        llama=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                          num_heads=32, rms_norm_eps=1e-6),
    ),
    # Tiny: unit tests (seconds on one CPU core), 224px input so the real pipeline shapes apply.
    "tiny": OpenVLAConfig(
        dino=_dino(32, 3, 2, 64),
        siglip=_siglip(48, 3, 2, 96),
        llama=LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    ),
    # Debug: seconds per train step on a 2-core CPU, real Llama vocabulary.
    "debug": OpenVLAConfig(
        dino=_dino(64, 3, 4, 128),
        siglip=_siglip(64, 3, 4, 128),
        llama=LlamaConfig(vocab_size=32064, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4),
    ),
    # Mid-size: benchmarks (Llama width 512 x 4 layers, small towers).
    "mid": OpenVLAConfig(
        dino=_dino(192, 4, 3, 768),
        siglip=_siglip(192, 4, 3, 768),
        llama=LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8),
    ),
    # `make demo` (configs/demo.py): trained from scratch on 64x64 Meta-World frames on 2 CPU cores.
    # Towers of width 128 with 16-px patches (a 4x4 grid keeps the Llama sequence short; smaller
    # patches were slower per step); depth 3 because the towers return the second-to-last block.
    # Width 128 instead of 64 costs little per step (the Llama dominates) and learned faster
    # (BENCHMARKS.md, "Design choices measured").
    # Vocabulary: a 512-piece demo tokenizer whose last 256 ids are the action bins, plus PAD, padded
    # to a multiple of 64 rows as OpenVLA pads 32001 -> 32064.
    "demo": OpenVLAConfig(
        dino=_dino(128, 3, 4, 512, image_size=64, patch=16),
        siglip=_siglip(128, 3, 4, 512, image_size=64, patch=16),
        llama=LlamaConfig(vocab_size=576, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          max_seq_len=256),
        base_vocab_size=512, pad_token_id=512,
    ),
}


# Execution switches that checkpoints written before `ExecutionConfig` store inside the part configs.
_LEGACY_EXECUTION_KEYS = ("unroll_layers", "attention_query_block")


def config_from_dict(d) -> OpenVLAConfig:
    """Inverse of `dataclasses.asdict(OpenVLAConfig)` (as stored in a checkpoint's meta['model']).

    Older checkpoints stored `unroll_layers` / `attention_query_block` in the part configs; a value
    other than None there becomes the `execution` setting (unless `execution` is stored too)."""
    legacy = {}

    def part(x, cls):
        x = dict(x)
        for k in _LEGACY_EXECUTION_KEYS:
            if k in x and (v := x.pop(k)) is not None:
                legacy[k] = v
        if cls is ViTConfig:
            x["mean"], x["std"] = tuple(x["mean"]), tuple(x["std"])
        return cls(**x)

    rest = {k: v for k, v in d.items() if k not in ("dino", "siglip", "llama", "execution")}
    parts = dict(dino=part(d["dino"], ViTConfig), siglip=part(d["siglip"], ViTConfig), llama=part(d["llama"], LlamaConfig))
    execution = ExecutionConfig(**d["execution"]) if "execution" in d else ExecutionConfig(**legacy)
    return OpenVLAConfig(**parts, execution=execution, **rest)


def get_preset(name: str) -> OpenVLAConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]
