"""Loading a policy's parts: a vla_jax checkpoint (orbax layout of `vla_jax/checkpoints.py`) or an
HF OpenVLA folder -> (config, params, dataset statistics, tokenizer, BatchSpec), the body of
`Policy.load`, and the opt-in persistent XLA compilation cache.

The contract a policy runs by (image size, test-time centre crop, action codec) is the checkpoint's
`batch_spec` asset (`vla_jax.spec.BatchSpec`). Checkpoints written before that asset existed, HF
folders and policies built in memory get it from `derive_batch_spec`, the one place that derives it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
from typing import Any, Mapping, Optional, Tuple, Union

import jax
import numpy as np

from vla_jax import permissions
from vla_jax.models.config import OpenVLAConfig, config_from_dict, with_dtypes
from vla_jax.models.decode import split_layers
from vla_jax.models.openvla import OpenVLA
from vla_jax.policy import mesh as policy_mesh
from vla_jax.policy.decoding import DEFAULT_BATCH_BUCKETS, DEFAULT_PROMPT_BUCKET
from vla_jax.spec import BATCH_SPEC_ASSET, BatchSpec
from vla_jax.tokenizer import VLATokenizer

CACHE_ENV = "VLA_JAX_COMPILATION_CACHE"


# ----------------------------------------------------------------------------------------------
# Persistent compilation cache


def default_cache_root() -> str:
    """`$VLA_JAX_CACHE_DIR`, default `~/.cache/vla_jax` (shared with the dataset statistics cache)."""
    return os.environ.get("VLA_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vla_jax"))


def enable_compilation_cache(setting: Union[None, bool, str] = None) -> Optional[str]:
    """Turns on JAX's persistent compilation cache; returns its folder, or None when left off.

    setting: None reads $VLA_JAX_COMPILATION_CACHE ('', '0' or 'false': off; '1', 'true' or
    'default': the default folder; anything else: that folder); True = the default folder
    `<cache root>/jax_cache`; False = off; a string = that folder.
    """
    if setting is None:
        env = os.environ.get(CACHE_ENV, "").strip()
        setting = False if env.lower() in ("", "0", "false", "no") else (
            True if env.lower() in ("1", "true", "yes", "default") else env)
    if setting is False:
        return None
    path = os.path.join(default_cache_root(), "jax_cache") if setting is True else os.fspath(setting)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # The decoders of small models compile in well under JAX's default 1 s threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def derive_batch_spec(cfg: OpenVLAConfig, tokenizer: VLATokenizer, norm_stats: Mapping[str, Any],
                      run_config: Optional[Mapping[str, Any]] = None) -> BatchSpec:
    """The contract of a checkpoint without a `batch_spec` asset, as it was decided before the asset
    existed: image size and action codec from the model config, text length from the tokenizer, and
    the test-time centre crop when the run config's data section trained with the random resized crop
    (OpenVLA's test-time crop undoes it; colour ops need nothing). run_config None (HF folders, policies
    built in memory): no crop."""
    data = (run_config or {}).get("data") or {}
    random_crop = bool(data.get("image_aug", False)) and "random_resized_crop" in data.get("image_aug_ops",
                                                                                        ("random_resized_crop",))
    datasets = sum(1 for v in dict(norm_stats).values() if isinstance(v, Mapping) and "action" in v)
    # cameras and proprio: the model config's (camera names `vla_jax.spec.batch.camera_names`)
    return BatchSpec.for_model(cfg, text_len=tokenizer.max_len, num_datasets=max(1, datasets),
                               test_center_crop=random_crop)


def model_inputs(cfg: OpenVLAConfig) -> Tuple[int, int]:
    """(cameras, proprio dims) a model config takes: `num_images` (1 when the config predates it) and
    `proprio_dim` (0 = no proprio token)."""
    return int(getattr(cfg, "num_images", 1) or 1), int(getattr(cfg, "proprio_dim", 0) or 0)


def check_runnable(spec: BatchSpec, cfg: OpenVLAConfig, where: str) -> None:
    """ValueError naming the field and value when `spec` is not what this policy runs: the model's
    cameras and proprio, its image size and bins, and an action codec the model config runs: OpenVLA's
    autoregressive decoding of one action, or (OpenVLA-OFT) parallel decoding with the config's
    chunk_size, action_head and action_dim."""
    codec = spec.codec
    model_codec = (bool(cfg.parallel_decoding), int(cfg.chunk_size), str(cfg.action_head), int(cfg.action_dim))
    spec_codec = (codec.decoding == "parallel", codec.chunk_size, codec.head,
                  codec.action_dim if codec.decoding == "parallel" else model_codec[3])
    if spec_codec != model_codec:
        raise ValueError(f"{where}: the action codec has decoding={codec.decoding!r}, chunk_size={codec.chunk_size}, "
                         f"head={codec.head!r}, action_dim={codec.action_dim}, but the model config has "
                         f"parallel_decoding={cfg.parallel_decoding}, chunk_size={cfg.chunk_size}, "
                         f"action_head={cfg.action_head!r}, action_dim={cfg.action_dim}: the checkpoint's "
                         f"batch_spec and its model do not belong together")
    n_images, p_dim = model_inputs(cfg)
    if len(spec.cameras) != n_images or (spec.proprio_dim or 0) != p_dim:
        raise ValueError(f"{where}: cameras={list(spec.cameras)}, proprio_dim={spec.proprio_dim}, but the model "
                         f"config has num_images={n_images}, proprio_dim={p_dim or None}: the checkpoint's "
                         f"batch_spec and its model do not belong together")
    model = (cfg.image_size, cfg.n_action_bins, cfg.base_vocab_size)
    if (spec.image_size, codec.n_bins, codec.base_vocab_size) != model:
        raise ValueError(f"{where}: image_size={spec.image_size}, n_bins={codec.n_bins}, "
                         f"base_vocab_size={codec.base_vocab_size} do not match the model config ({model[0]}, "
                         f"{model[1]}, {model[2]})")


def checkpoint_batch_spec(assets: Mapping[str, Any], cfg: OpenVLAConfig, tokenizer: VLATokenizer,
                          where: str) -> BatchSpec:
    """A vla_jax checkpoint's BatchSpec: its `batch_spec` asset, else `derive_batch_spec` from its run
    config; checked against the model (`check_runnable`) before any weight is read."""
    if assets.get(BATCH_SPEC_ASSET) is not None:
        spec = BatchSpec.from_json(assets[BATCH_SPEC_ASSET], where=f"{where}/{BATCH_SPEC_ASSET}")
    else:
        spec = derive_batch_spec(cfg, tokenizer, assets.get("dataset_statistics") or {}, assets.get("config") or {})
    check_runnable(spec, cfg, f"{where}/{BATCH_SPEC_ASSET}")
    return spec


def tokenizer_from_asset(asset: Mapping[str, Any], where: str) -> VLATokenizer:
    """A checkpoint's tokenizer asset (SentencePiece model embedded as base64) -> VLATokenizer.

    The model bytes are written once to `<cache root>/tokenizers/<sha256>.model` (a temporary
    folder when that is not writable), since SentencePiece loads from a file."""
    b64 = asset.get("sentencepiece_model_b64")
    if asset.get("kind") != "llama-sentencepiece" or not b64:
        raise ValueError(f"{where}: its tokenizer asset (kind {asset.get('kind')!r}) embeds no SentencePiece model; "
                         f"a checkpoint trained on synthetic data cannot act on instructions. Pass tokenizer=PATH "
                         f"to Policy.load to supply the Llama-2 tokenizer.model")
    data = base64.b64decode(b64)
    name = hashlib.sha256(data).hexdigest()[:24] + ".model"
    for folder in (os.path.join(default_cache_root(), "tokenizers"), os.path.join(tempfile.gettempdir(), "vla_jax")):
        path = os.path.join(folder, name)
        try:
            if not os.path.isfile(path):
                os.makedirs(folder, exist_ok=True)
                fd, tmp = permissions.mkstemp(dir=folder, suffix=".tmp")  # not 0600
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            break
        except OSError:
            continue
    act = asset.get("action_tokenizer", {})
    return VLATokenizer.from_file(path, max_len=int(asset.get("max_seq_len", 64)), n_bins=int(act.get("n_bins", 256)),
                                  action_dim=int(asset.get("action_dim", 7)))


def _abstract_params(state_dir, param_dtype: Optional[str], device, placement=None) -> dict:
    """The checkpoint's params as ShapeDtypeStructs on `device`, or where `placement` (a tree of
    shardings over the model's params) puts them (read from orbax metadata only). Leaves the
    placement does not cover (LoRA adapters) are replicated over its mesh."""
    import orbax.checkpoint as ocp

    from flax import traverse_util

    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(state_dir).item_metadata.tree
    if "params" not in tree:
        raise ValueError(f"{state_dir} holds no 'params' (top-level keys {sorted(tree)})")

    def plain(t):
        return {k: plain(v) for k, v in t.items()} if hasattr(t, "items") and not hasattr(t, "shape") else t

    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = {}
    if placement is not None:
        placed = traverse_util.flatten_dict(placement)
        sharding = jax.sharding.NamedSharding(next(iter(placed.values())).mesh, jax.sharding.PartitionSpec())
    flat = traverse_util.flatten_dict(plain(tree["params"]))
    return traverse_util.unflatten_dict({
        p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(param_dtype or m.dtype), sharding=placed.get(p, sharding))
        for p, m in flat.items()})


def _lora_config(run_config: Mapping[str, Any]):
    """The run config's LoRA settings (rank, alpha, targets) -> lora.LoraConfig."""
    from vla_jax.models import lora

    settings = dict(run_config.get("lora") or {})
    if "rank" not in settings:
        raise ValueError("the checkpoint holds LoRA adapters but its config asset has no lora.rank")
    kw = {k: settings[k] for k in ("rank", "alpha", "targets") if k in settings}
    if isinstance(kw.get("targets"), list):
        kw["targets"] = tuple(kw["targets"])
    return lora.LoraConfig(**kw)


def _merge_lora(params: dict, run_config: Mapping[str, Any], shardings: Any = None) -> dict:
    """{..., 'lora': adapters} -> base params with W + (alpha/r) A @ B folded in (run config's LoRA settings).

    One jitted program; the adapted kernels are donated, so the merge needs no second copy of them.
    shardings: the base params' NamedShardings (sharded inference): each device folds its own shard
    (the adapters are placed by `mesh.lora_shardings`); None keeps the kernels' device."""
    from flax import traverse_util

    from vla_jax.models import lora

    lcfg = _lora_config(run_config)
    base, adapters = lora.split_lora(params)
    kernels = {t for tgt in lora.targets(base, lcfg) for t in tgt.kernels}
    flat = traverse_util.flatten_dict(base)
    adapted = {k: v for k, v in flat.items() if k in kernels}
    rest = {k: v for k, v in flat.items() if k not in kernels}
    out_shardings = None
    if shardings is not None:
        flat_shardings = traverse_util.flatten_dict(shardings)
        out_shardings = {k: flat_shardings[k] for k in adapted}

    def fold(adapted, rest, adapters):
        base = traverse_util.unflatten_dict({**adapted, **rest})
        merged = traverse_util.flatten_dict(lora.merge(base, adapters, lcfg))
        return {k: merged[k] for k in adapted}

    fold = jax.jit(fold, donate_argnums=(0,), out_shardings=out_shardings)
    # The jit takes flat dicts: tuple keys are fine pytree keys for JAX.
    merged = fold(adapted, rest, adapters)
    return traverse_util.unflatten_dict({**rest, **merged})


def _check_param_tree(cfg: OpenVLAConfig, params: dict, where: str) -> None:
    from flax import traverse_util

    n_images, p_dim = model_inputs(cfg)  # the model's inputs: its cameras and proprio (projector params)
    s = cfg.image_size
    pixels = np.zeros((1, n_images, s, s, 3) if n_images > 1 else (1, s, s, 3), np.uint8)
    kw = {"proprio": np.zeros((1, p_dim), np.float32)} if p_dim else {}
    want = traverse_util.flatten_dict(jax.eval_shape(
        lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), pixels, np.ones((1, 4), np.int32), **kw))["params"])
    have = traverse_util.flatten_dict(params)
    want = {k: tuple(getattr(v, "value", v).shape) for k, v in want.items()}
    bad = sorted(set(want) ^ set(have)) + [k for k in want if k in have and tuple(have[k].shape) != want[k]]
    if bad:
        k = bad[0]
        raise ValueError(f"{where}: parameter {'/'.join(k)} is {tuple(have[k].shape) if k in have else 'absent'} in "
                         f"the checkpoint but {want.get(k, 'absent')} in the model its meta describes")


def load_vla_checkpoint(path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                        tokenizer: Optional[str] = None, device=None,
                        placement_fn=None) -> Tuple[OpenVLAConfig, dict, dict, VLATokenizer, BatchSpec]:
    """A vla_jax checkpoint (workdir, its checkpoints/ folder or one step folder; the latest step)
    -> (config, params on `device`, dataset statistics, tokenizer, BatchSpec).

    tokenizer: a tokenizer.model to use instead of the checkpoint's tokenizer asset.
    placement_fn: optional `(config, spec) -> shardings` of the model's params (stacked layout), called
    before anything is read onto a device (sharded inference: it may also refuse, e.g. too little
    memory); the params are then restored straight into those shardings. The spec is read and checked
    (`checkpoint_batch_spec`) before that too."""
    from vla_jax import checkpoints as ckpt_lib

    step_dir = ckpt_lib.resolve_step_dir(path)
    assets = ckpt_lib.load_assets(str(step_dir))
    cfg = config_from_dict(assets["meta"]["model"])
    cfg = with_dtypes(cfg, dtype or cfg.dtype, param_dtype or cfg.param_dtype, remat=False)
    if tokenizer:
        tok = VLATokenizer.from_file(tokenizer, n_bins=cfg.n_action_bins, action_dim=cfg.action_dim)
    else:
        tok = tokenizer_from_asset(assets.get("tokenizer") or {}, str(step_dir))
    spec = checkpoint_batch_spec(assets, cfg, tok, str(step_dir))
    device = device or jax.devices()[0]
    placement = placement_fn(cfg, spec) if placement_fn is not None else None
    abstract = _abstract_params(step_dir / "state", param_dtype, device, placement)
    if placement is not None and "lora" in abstract:
        # Adapters beside their kernels' shards, so that the merge below runs shard by shard.
        mesh = next(iter(jax.tree.leaves(placement))).mesh
        adapters = policy_mesh.lora_shardings(cfg, _lora_config(assets.get("config") or {}), mesh)
        abstract = _abstract_params(step_dir / "state", param_dtype, device, dict(placement, lora=adapters))
    params = ckpt_lib.load_params(str(step_dir), abstract)
    if "lora" in params:
        params = _merge_lora(params, assets.get("config") or {}, placement)
    _check_param_tree(cfg, params, str(step_dir))
    return cfg, params, dict(assets.get("dataset_statistics") or {}), tok, spec


def recorded_dataset_configs(path: str) -> dict:
    """{dataset name: DatasetConfig fields} of the datasets a vla_jax checkpoint trained on (its
    `training_data` asset); {} for checkpoints written before that asset existed."""
    from vla_jax import checkpoints as ckpt_lib

    record = ckpt_lib.load_assets(path).get("training_data") or {}
    return {d["name"]: dict(d) for d in record.get("datasets", [])}


def is_hf_dir(path: str) -> bool:
    """True for an HF OpenVLA folder (False when vla_jax.hf is not installed)."""
    try:
        from vla_jax.hf import is_hf_dir as hf_check
    except ImportError:  # HF support not installed in this tree: only vla_jax checkpoints load
        return False
    return hf_check(path)


def load_hf_checkpoint(path: str, *, dtype: Optional[str] = None, param_dtype: Optional[str] = None,
                       tokenizer: Optional[str] = None, device=None, placement_fn=None):
    """An HF OpenVLA folder (`openvla/openvla-7b` layout) -> the same tuple as `load_vla_checkpoint`.
    placement_fn: as there (the weights are read into host memory first, then placed).

    HF folders record no BatchSpec: it is derived (`derive_batch_spec`) without the test-time crop, since
    they do not say whether training used image augmentation: pass center_crop=True to `Policy.load`
    for such fine-tuned checkpoints (e.g. OpenVLA's LIBERO ones)."""
    from vla_jax.hf import load_hf_dir

    cfg, params, norm_stats, tok_path = load_hf_dir(path, dtype=dtype or "bfloat16", param_dtype=param_dtype)
    tok_path = tokenizer or tok_path
    if tok_path is None:
        raise ValueError(f"{path} has no tokenizer.model; pass tokenizer=PATH (the Llama-2 SentencePiece model)")
    tok = VLATokenizer.from_file(tok_path, n_bins=cfg.n_action_bins, action_dim=cfg.action_dim)
    norm_stats = dict(norm_stats or {})
    spec = derive_batch_spec(cfg, tok, norm_stats)
    check_runnable(spec, cfg, path)
    placement = placement_fn(cfg, spec) if placement_fn is not None else (device or jax.devices()[0])
    params = jax.device_put(params, placement)
    return cfg, params, norm_stats, tok, spec


# ----------------------------------------------------------------------------------------------
# Policy.load


def load_policy(cls, path: str, *, center_crop: Optional[bool] = None, action_tokens_only: bool = False,
                dtype: Optional[str] = None, param_dtype: Optional[str] = None, tokenizer: Optional[str] = None,
                compilation_cache: Union[None, bool, str] = None, device=None, mesh=None,
                device_memory: Optional[int] = None, **kw):
    """The body of `Policy.load` (see there): `cls` is the Policy class, built from what the checkpoint holds."""
    enable_compilation_cache(compilation_cache)
    path = os.fspath(path)
    if not is_hf_dir(path):  # orbax reads metadata only through absolute paths
        path = os.path.abspath(path)
    precompiled = {}
    placement_fn = None
    if mesh is not None:
        mesh = policy_mesh.as_mesh(mesh)

        def place(cfg, spec):
            if len(spec.cameras) != 1 or spec.proprio_dim:
                raise ValueError(f"{path}: sharded inference (mesh=) takes one camera and no proprio; this checkpoint "
                                 f"has cameras={list(spec.cameras)}, proprio_dim={spec.proprio_dim}: load it without mesh=")
            shardings = policy_mesh.param_shardings(cfg, mesh)  # checks the mesh divides the dimensions
            parallel = spec.codec.decoding == "parallel"  # OpenVLA-OFT: one pass on the stacked layout
            num_tokens = spec.codec.num_action_tokens + (1 if parallel else 0)  # Policy.default_num_tokens
            batch = min(int(b) for b in kw.get("batch_buckets", DEFAULT_BATCH_BUCKETS))
            limit = cfg.llama.max_seq_len - cfg.num_inserted_tokens - num_tokens  # Policy.max_prompt_len
            length = min(2 * int(kw.get("prompt_bucket", DEFAULT_PROMPT_BUCKET)), limit)
            key = (num_tokens, batch, length)
            abstract = (policy_mesh.abstract_params if parallel else policy_mesh.abstract_split_params)(cfg, mesh)
            t0 = time.perf_counter()
            compiled = policy_mesh.compile_decoder(OpenVLA(cfg), abstract, mesh, key[1], key[2], key[0])
            policy_mesh.check_fits(compiled, mesh, device_memory, what=path)
            if not action_tokens_only:  # same program as the policy's own for this bucket
                precompiled[key] = (compiled, time.perf_counter() - t0)
            return shardings

        placement_fn = place
    if is_hf_dir(path):
        load = load_hf_checkpoint
    else:
        kw.setdefault("dataset_configs", recorded_dataset_configs(path))
        load = load_vla_checkpoint
    cfg, params, stats, tok, spec = load(path, dtype=dtype, param_dtype=param_dtype, tokenizer=tokenizer,
                                         device=device, placement_fn=placement_fn)
    if spec.codec.decoding != "parallel":  # parallel decoding (OFT) runs on the stacked layout
        params = split_layers(params, consume=True)  # freshly loaded: no second copy of the layers
    policy = cls(cfg, params, tok, stats, spec=spec, center_crop=center_crop, action_tokens_only=action_tokens_only,
                 source=path, mesh=mesh, **kw)
    for key, (compiled, seconds) in precompiled.items():
        policy._executables[key], policy.compile_seconds[key] = compiled, seconds
    return policy
