"""Run set-up from an ml_collections config: checks, distributed init, model, mesh, data, hooks,
preemption. train.py calls these in order; each check fails before anything is written."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from typing import Any, Dict, Tuple

import jax
import numpy as np

from vla_jax import sharding as shd
from vla_jax.models.config import OpenVLAConfig, get_preset, with_dtypes
from vla_jax.spec import BatchSpec, camera_names

log = logging.getLogger(__name__)

DATA_SOURCES = ("rlds", "synthetic")


# ----------------------------------------------------------------------------------------------
# Distributed


def maybe_initialize_distributed(mode: str = "auto", coordinator: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """`jax.distributed.initialize` when launched as several processes.

    mode 'auto': initialize when a coordinator is given (flag or JAX_COORDINATOR_ADDRESS) or on a
    multi-host TPU slice / SLURM job (auto-detected by JAX); 'true' always; 'false' never.
    """
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"--distributed={mode!r}; expected auto, true or false")
    multi_env = ("," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
                 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
                 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))
    if mode == "false" or (mode == "auto" and not coordinator and not multi_env):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {}
    if coordinator:
        kw = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)


# ----------------------------------------------------------------------------------------------
# Model and mesh


def model_config(model_cfg) -> OpenVLAConfig:
    """config.model (preset, dtype, param_dtype, remat, image_size, OpenVLA-OFT's parallel_decoding,
    chunk_size, action_head, and the inputs num_images, proprio_dim, film: the one place a run sets
    them) -> OpenVLAConfig. A recorded config without the OFT or input keys (older checkpoints) is
    OpenVLA's autoregressive one-camera model."""
    cfg = with_dtypes(get_preset(model_cfg.preset), model_cfg.dtype, model_cfg.param_dtype, remat=model_cfg.remat)
    oft = dict(parallel_decoding=model_cfg.get("parallel_decoding", False), chunk_size=model_cfg.get("chunk_size", 1),
               action_head=model_cfg.get("action_head", "tokens"), num_images=model_cfg.get("num_images", 1),
               proprio_dim=model_cfg.get("proprio_dim", 0) or None, film=model_cfg.get("film", False))
    try:
        cfg = dataclasses.replace(cfg, **oft)  # OpenVLAConfig checks the combination
    except ValueError as e:
        raise ValueError("config.model (" + ", ".join(f"{k}={v!r}" for k, v in oft.items()) + f"): {e}") from None
    if model_cfg.image_size:
        if model_cfg.image_size % cfg.dino.patch_size:
            raise ValueError(f"config.model.image_size={model_cfg.image_size} must be a multiple of the patch size "
                             f"{cfg.dino.patch_size}")
        cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=model_cfg.image_size),
                                  siglip=dataclasses.replace(cfg.siglip, image_size=model_cfg.image_size))
    return cfg


def geometry(cfg: OpenVLAConfig) -> Dict[str, Any]:
    """JSON-able model geometry (stored in checkpoints, compared on resume). The execution switches
    (`cfg.execution`) are left out: they change no values, and a run may resume on another backend."""
    d = dataclasses.asdict(cfg)
    d.pop("execution")
    return d


def make_mesh(mesh_cfg, devices=None):
    """config.mesh (data, fsdp, tensor; one may be -1) -> Mesh over all devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    try:
        return shd.make_mesh(shape, devices)
    except ValueError as e:
        raise ValueError(f"config.mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) does not fit the "
                         f"{len(devices)} devices of this run ({jax.process_count()} process(es)): {e}") from None


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))


def check_batch_layout(cfg, mesh) -> int:
    """Global batch vs data-parallel size, micro-batches and processes. Returns the per-process batch."""
    b, accum, dp, procs = cfg.global_batch_size, cfg.grad_accum_steps, data_parallel_size(mesh), jax.process_count()
    if b <= 0 or accum <= 0:
        raise ValueError(f"config.global_batch_size={b} and config.grad_accum_steps={accum} must be positive")
    if b % (dp * accum):
        raise ValueError(f"config.global_batch_size={b} must be divisible by the data-parallel size "
                         f"({dp} = mesh data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) times "
                         f"config.grad_accum_steps={accum}, i.e. by {dp * accum}")
    if b % procs:
        raise ValueError(f"config.global_batch_size={b} must be divisible by the {procs} processes")
    return b // procs


def check_run_config(cfg) -> None:
    """Value checks that need no devices (the config's keys are checked by its lock)."""
    if cfg.init_from is None:
        raise ValueError("this config needs a starting checkpoint: set --config.init_from to a vla_jax "
                         "checkpoint (workdir or step folder) or an HF OpenVLA folder")
    if cfg.num_steps <= 0 or cfg.save_every <= 0:
        raise ValueError(f"config.num_steps={cfg.num_steps} and config.save_every={cfg.save_every} must be positive")
    if cfg.steps_per_call < 1:
        raise ValueError(f"config.steps_per_call={cfg.steps_per_call} must be >= 1")
    if cfg.data_source not in DATA_SOURCES:
        raise ValueError(f"config.data_source={cfg.data_source!r}; expected one of {DATA_SOURCES}")
    if cfg.lora.enabled and (cfg.freeze.vision or cfg.freeze.llm or cfg.freeze.projector):
        raise ValueError("config.lora.enabled trains only the adapters; config.freeze.* must stay False with LoRA")


def fit_warmup(cfg) -> None:
    """A warmup as long as the run or longer (e.g. `--config.num_steps=4` on configs/debug.py, whose warmup
    is 10 steps) is shortened to half the run, with a warning, instead of stopping it: a short smoke run
    should run. Edits cfg.optim.warmup_steps (the checkpoint's config asset records the value used)."""
    warm, steps = int(cfg.optim.warmup_steps), int(cfg.num_steps)
    if cfg.optim.schedule != "constant" and steps > 0 and warm >= steps:
        cfg.optim.warmup_steps = steps // 2
        log.warning("config.optim.warmup_steps=%d is not shorter than config.num_steps=%d: warming up over %d "
                    "steps instead", warm, steps, cfg.optim.warmup_steps)


def remove_if_empty(path: str) -> None:
    """Removes folder `path` if it exists and is empty (a failed run leaves no empty checkpoints/ behind)."""
    try:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    except OSError:  # another process wrote into it meanwhile, or a remote path: leave it
        pass


def test_center_crop(data_cfg) -> bool:
    """Whether the policy applies OpenVLA's test-time 0.9-area centre crop: exactly when training used
    the random-resized-crop augmentation (the crop undoes it; the colour ops need nothing at test time).
    data_cfg: config.data (a ConfigDict or the `data` dict of a recorded run config)."""
    ops = data_cfg.get("image_aug_ops", ("random_resized_crop",))
    return bool(data_cfg.get("image_aug", False)) and "random_resized_crop" in tuple(ops)


def check_inputs_agree(data_cfg, model_cfg: OpenVLAConfig) -> None:
    """The data's cameras and proprio must be the model's: config.data.cameras == config.model.num_images
    and config.data.use_proprio == (config.model.proprio_dim > 0); ValueError naming both flags."""
    n = int(data_cfg.get("cameras", 1))
    if n != model_cfg.num_images:
        raise ValueError(f"config.data.cameras={n} but config.model.num_images={model_cfg.num_images}: the model "
                         f"reads one image per camera the data delivers (set both to N)")
    use = bool(data_cfg.get("use_proprio", False))
    if use != (model_cfg.proprio_dim is not None):
        raise ValueError(f"config.data.use_proprio={use} but config.model.proprio_dim={model_cfg.proprio_dim or 0}: "
                         f"a proprio token needs the data's proprio and the data's proprio needs the token (set "
                         f"use_proprio=True with proprio_dim=P, the dataset's state size, or False with 0)")


def batch_spec(cfg, model_cfg: OpenVLAConfig, num_datasets: int = 1) -> BatchSpec:
    """The run's batch layout (stored with every checkpoint): the model's image size and action codec,
    config.data.max_seq_len text tokens, the mixture's `num_datasets`, the test-time crop rule, the
    cameras (`spec.camera_names(config.data.cameras)`: 'primary', 'wrist', ...) and proprio_dim.
    The data's actions per frame (config.data.action_chunk) must be the model's chunk_size, its
    cameras and proprio the model's num_images and proprio_dim (`check_inputs_agree`)."""
    k = int(cfg.data.get("action_chunk", 1))
    if k != model_cfg.chunk_size:
        raise ValueError(f"config.data.action_chunk={k} but config.model.chunk_size={model_cfg.chunk_size}: the model "
                         f"predicts chunk_size actions per frame and the data must carry as many (set both to K)")
    check_inputs_agree(cfg.data, model_cfg)
    return BatchSpec.for_model(model_cfg, int(cfg.data.max_seq_len), num_datasets=int(num_datasets),
                               test_center_crop=test_center_crop(cfg.data),
                               cameras=camera_names(int(cfg.data.get("cameras", 1))),
                               proprio_dim=model_cfg.proprio_dim)


def example_inputs(spec: BatchSpec) -> Tuple[np.ndarray, np.ndarray]:
    """model.init arguments from the layout: pixel_values uint8 [1, S, S, 3] ([1, N, S, S, 3] with N cameras;
    init creates the proprio projector from a zero state) and input_ids int32
    [1, text_len] (numpy: concrete for the model's checks)."""
    z = spec.zeros(1)
    return z["pixel_values"], np.ones_like(z["input_ids"])


def param_hooks(cfg):
    """ParamHooks for the run: LoRA's (from vla_jax.models.lora) when config.lora.enabled, else none."""
    from vla_jax.training.state import ParamHooks

    if not cfg.lora.enabled:
        return ParamHooks()
    try:
        from vla_jax.models import lora
    except ImportError:
        raise ValueError("config.lora.enabled=True but vla_jax/models/lora.py is not available in this "
                         "installation") from None
    return ParamHooks(**lora.hook_functions(lora.LoraConfig(rank=int(cfg.lora.rank), alpha=float(cfg.lora.alpha))))


def trainable(cfg, abstract_params, hooks):
    """The bool mask of trained parameters (hooks first, else the freeze options)."""
    from vla_jax.training.state import trainable_mask

    if hooks.trainable is not None:
        return hooks.trainable(abstract_params)
    return trainable_mask(abstract_params, vision=not cfg.freeze.vision, projector=not cfg.freeze.projector,
                          llm=not cfg.freeze.llm)


MODEL_KEYS = ("dino", "siglip", "projector", "llm")


def load_pretrained(path: str, abstract_params, model_cfg: OpenVLAConfig):
    """config.init_from -> the model's params (dino/siglip/projector/llm, no adapters) placed on the
    shardings of `abstract_params` (ShapeDtypeStructs), leaf by leaf: a vla_jax checkpoint or an HF
    OpenVLA folder (vla_jax.hf)."""
    from vla_jax import checkpoints as ckpt_lib

    base = {k: abstract_params[k] for k in MODEL_KEYS}
    try:
        from vla_jax import hf
    except ImportError:
        hf = None
    if hf is not None and hf.is_hf_dir(path):
        # Cameras, proprio and FiLM are run settings, not in an HF config.json (OFT_REFERENCE.md §7-§9):
        # the folder's geometry is compared with the model's one-camera, no-proprio, no-FiLM form (new
        # modules such as params['film'] start from their init, training.state.NEW_MODULES).
        expect = dataclasses.replace(model_cfg, num_images=1, proprio_dim=None, film=False)
        return hf.load_hf_params(path, base, expect_config=expect)
    return ckpt_lib.load_params(path, base)


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Data:
    """The input of a run: `iterator` yields this process's numpy batches (laid out by `batch_spec`)
    and has get/set_state."""

    iterator: Any
    dataset_names: list
    statistics: Dict[str, Any]
    tokenizer_asset: Dict[str, Any]
    batch_spec: BatchSpec
    training_data: Any = None  # checkpoint asset: what the run trains on (vla_jax.data.oxe.record); None if synthetic


def make_data(cfg, model_cfg: OpenVLAConfig, per_process_batch: int, mesh) -> Data:
    """config.data_source 'rlds' (the real pipeline) or 'synthetic' (tests, benchmarks)."""
    from vla_jax.checkpoints import tokenizer_asset

    if cfg.data_source == "synthetic":
        from vla_jax.training.synthetic import SyntheticBatches

        start, stop = shd.process_batch_rows(mesh, cfg.global_batch_size)
        spec = batch_spec(cfg, model_cfg, cfg.synthetic.num_datasets)
        it = SyntheticBatches(cfg.global_batch_size, spec, seed=cfg.seed, row_start=start, row_stop=stop,
                              image_palette=cfg.synthetic.palette or None)
        names = [f"synthetic_{i}" for i in range(cfg.synthetic.num_datasets)]
        stats = {n: {"synthetic": True} for n in names}
        return Data(it, names, stats, {"kind": "synthetic", "max_seq_len": cfg.data.max_seq_len,
                                       "action_dim": model_cfg.action_dim}, spec)

    from vla_jax.data import pipeline
    from vla_jax.tokenizer import VLATokenizer

    if not cfg.tokenizer or not os.path.isfile(cfg.tokenizer):
        what = "config.tokenizer is empty" if not cfg.tokenizer else f"config.tokenizer={cfg.tokenizer!r} is not a file"
        raise ValueError(f"{what}: pass --config.tokenizer=PATH/tokenizer.model, the Llama-2 SentencePiece model. "
                         f"Fine-tuning: the tokenizer.model in the HF OpenVLA folder you start from (e.g. a download of "
                         f"openvla/openvla-7b); pretraining: the one in the base Llama-2 folder (meta-llama/Llama-2-7b-hf). "
                         f"Tests and configs/debug.py use tests/fixtures/data/llama2_tokenizer/tokenizer.model")
    tok = VLATokenizer.from_file(cfg.tokenizer, max_len=cfg.data.max_seq_len, n_bins=model_cfg.n_action_bins,
                                 action_dim=model_cfg.action_dim)
    if tok.tokenizer.vocab_size != model_cfg.base_vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer} has {tok.tokenizer.vocab_size} pieces but the model's "
                         f"base_vocab_size is {model_cfg.base_vocab_size}")
    data_cfg = pipeline.DataConfig.from_config(dict(cfg.data.to_dict(), batch_size=per_process_batch,
                                                    resize_size=model_cfg.image_size, seed=cfg.seed, repeat=True))
    it = pipeline.make_train_iterator(data_cfg, tok)
    from vla_jax.data.oxe.record import training_data_record

    record = training_data_record(cfg.data.data_dir, cfg.data.mixture, cfg.data.split, cfg.data.dataset_configs,
                                  cfg.tokenizer)
    check_proprio_statistics(it.dataset_statistics, model_cfg)
    return Data(it, list(it.dataset_names), it.dataset_statistics, tokenizer_asset(tok, model_cfg.action_dim),
                batch_spec(cfg, model_cfg, len(it.dataset_names)), record)


def check_proprio_statistics(statistics: Dict[str, Any], model_cfg: OpenVLAConfig) -> None:
    """With a proprio token, every dataset's proprio (its statistics' size) must have the model's P."""
    if model_cfg.proprio_dim is None:
        return
    dims = {name: len(entry["proprio"]["q01"]) for name, entry in statistics.items()}
    bad = {name: d for name, d in dims.items() if d != model_cfg.proprio_dim}
    if bad:
        raise ValueError(f"config.model.proprio_dim={model_cfg.proprio_dim} but the data's proprio has "
                         f"{bad} dimensions (dataset: size; proprio_key, cut by proprio_indices)")


# ----------------------------------------------------------------------------------------------
# Preemption


class Preemption:
    """Turns SIGTERM (and SIGINT) into a flag checked between steps; all processes agree on it."""

    def __init__(self):
        self._flag = False
        self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handler(self, signum, frame):
        if self._flag and signum == signal.SIGINT:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._flag = True
        log.warning("received signal %d: saving a checkpoint after this step, then exiting", signum)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self._flag
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self._flag))))

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Flags


def _load_config_file(spec: str):
    """'configs/x.py:arg' -> the ConfigDict its get_config(arg) returns."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_vla_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def unknown_config_overrides(argv) -> list:
    """The `--config.a.b=...` arguments of argv whose key path does not exist in the config file."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return []
    cfg = _load_config_file(spec)
    bad = []
    for a in argv:
        if not a.startswith("--config."):
            continue
        node, path = cfg, a[len("--config."):].split("=", 1)[0].split(".")
        for i, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node.keys():
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                where = "config" + "".join(f".{k}" for k in path[:i])
                bad.append(f"--config.{'.'.join(path)}: {where} has no key {key!r} (its keys: {known})")
                break
            node = node[key]
    return bad


def parse_flags(argv):
    """absl flag parsing for train.py / plan.py that turns a mistyped --config.key into a clear error."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        bad = unknown_config_overrides(argv)
        if not bad:
            raise
        raise SystemExit("error: unknown config key(s):\n  " + "\n  ".join(bad)) from e
