"""OpenVLA as a policy: RGB image(s) + instruction(s) -> 7-DoF action(s), batched and jitted.

    policy = Policy.load("runs/debug")                  # vla_jax workdir / step folder, or an HF OpenVLA folder
    action = policy.predict_action(image, "put the carrot on the plate")      # float64 [action_dim]
    actions = policy.predict_actions(images, instructions)                    # float64 [B, action_dim]
    pred = policy.predict(images, instructions, keys, grippers)  # Prediction: tokens, normalized, actions
    # several cameras / proprio: an observation dict per row (vla_jax/policy/observation.py)
    chunk = policy.predict_action({"full_image": img, "wrist_image": wrist, "state": raw_state}, "open the drawer")

The checkpoint's contract (`vla_jax.spec.BatchSpec`, its `batch_spec` asset; derived for older
checkpoints and HF folders, `loading.derive_batch_spec`) sets the image size, the test-time crop, the
cameras (pixels uint8 [B, N, S, S, 3] in its camera order), the proprio size (the raw state normalized
with the dataset's statistics, upstream's inference rule) and the action codec; the codec
(`vla_jax.spec.ActionCodec`) is the one decoder and un-normalizer.

What happens (OPENVLA_REFERENCE.md §2-§4, §9):
1. Image: uint8 RGB [H, W, 3] -> the training pipeline's lanczos3 squash to the spec's image size
   (`vla_jax.data.transforms.resize_image`), then the 0.9-area centre crop when the spec says
   `test_center_crop` (training used the random resized crop), as OpenVLA's eval scripts do.
2. Prompt: `[BOS] + "In: What action should the robot take to {instruction.lower()}?\\nOut:" + [29871]`.
3. Decoding: rows padded to a batch bucket (a power of two), prompts to a multiple of `prompt_bucket`;
   each (batch, prompt length, tokens) bucket compiles once into one executable that prefills a static
   KV cache and runs the fixed-length greedy loop (`vla_jax.models.decode`). Pad rows copy a real row
   and are dropped; per-row lengths keep right-padding out of every row's attention. The argmax runs
   over the whole vocabulary, as OpenVLA's `generate` (`action_tokens_only=True`: action ids only).
4. Tokens -> `ActionCodec.decode` / `unnormalize` (float64, the gripper dimension raw), as OpenVLA's
   `predict_action`. 5. Gripper: OpenVLA's convention (1 = open) by default; `gripper="dataset"`
   returns the dataset's registered one (`vla_jax.spec.gripper`).
One difference from OpenVLA's `predict_action`, on purpose: see `upstream_eos_ids` (`stop_at_eos`).

OpenVLA-OFT checkpoints (codec decoding 'parallel'): step 3 is one jitted bidirectional pass per
(batch, prompt length) bucket (`vla_jax.models.parallel_decode`) predicting the whole chunk; tokens are
decoded as in step 4, the L1 head's normalized chunk goes straight to the un-normalization;
`predict_action` returns the chunk [K, action_dim]. Autoregressive-only options (stop_at_eos,
num_tokens, action_tokens_only) are refused.

Sharded inference: `Policy.load(path, mesh=(data, fsdp, tensor))` runs the same decoder (or OFT's single
pass) over a mesh (`vla_jax.policy.mesh`: training's rules, KV cache split over heads, memory checked
before loading).

Compilation: `warmup()` compiles chosen buckets up front; the persistent XLA cache (opt-in:
`Policy.load(compilation_cache=...)` or VLA_JAX_COMPILATION_CACHE) lets later processes skip it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from vla_jax.models.config import OpenVLAConfig
from vla_jax.models.decode import greedy_decode, is_split, split_layers, stack_layers
from vla_jax.models.parallel_decode import parallel_decode
from vla_jax.models.openvla import OpenVLA
from vla_jax.policy import inputs
from vla_jax.policy import observation as policy_obs
from vla_jax.policy import mesh as policy_mesh
from vla_jax.policy.decoding import DEFAULT_BATCH_BUCKETS, DEFAULT_PROMPT_BUCKET, bucket, upstream_eos_ids
from vla_jax.policy.loading import check_runnable, derive_batch_spec, load_policy
from vla_jax.policy.prediction import Prediction, _per_row  # noqa: F401 (Prediction: re-exported)
from vla_jax.policy.statistics import DatasetStatistics
from vla_jax.spec import ActionCodec, BatchSpec
from vla_jax.tokenizer import VLATokenizer

_WARMUP_INSTRUCTION = "pick up the object and put it in the bowl"
log = logging.getLogger(__name__)


class Policy(DatasetStatistics):
    """A loaded OpenVLA checkpoint that maps (observation, instruction) to actions. Thread-safe. Its dataset
    statistics, un-normalization and gripper conventions: `vla_jax.policy.statistics.DatasetStatistics`."""

    def __init__(self, config: OpenVLAConfig, params: Any, tokenizer: VLATokenizer, norm_stats: Mapping[str, Any], *,
                 spec: Optional[BatchSpec] = None, center_crop: Optional[bool] = None, action_tokens_only: bool = False,
                 batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS, prompt_bucket: int = DEFAULT_PROMPT_BUCKET,
                 source: str = "", dataset_configs: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 mesh=None):
        buckets = sorted({int(b) for b in batch_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"batch_buckets must be positive sizes, got {batch_buckets!r}")
        if prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
        t = tokenizer.tokenizer
        if (t.vocab_size, t.bos_id, t.eos_id) != (config.base_vocab_size, config.bos_token_id, config.eos_token_id):
            raise ValueError(f"tokenizer (vocab {t.vocab_size}, bos {t.bos_id}, eos {t.eos_id}) does not fit the model "
                             f"(base_vocab_size {config.base_vocab_size}, bos {config.bos_token_id}, "
                             f"eos {config.eos_token_id})")
        if tokenizer.codec.n_bins != config.n_action_bins:
            raise ValueError(f"tokenizer has {tokenizer.codec.n_bins} action bins, the model "
                             f"{config.n_action_bins}")
        self.config, self.tokenizer = config, tokenizer
        # The contract (image size, test-time crop, action codec): the checkpoint's, or derived for a policy
        # built in memory (no crop); center_crop None = the spec's test_center_crop.
        self.spec = spec if spec is not None else derive_batch_spec(config, tokenizer, norm_stats)
        check_runnable(self.spec, config, source or "Policy")
        # OpenVLA-OFT (codec.decoding 'parallel'): one bidirectional pass per call on the stacked params.
        self.parallel = self.spec.codec.decoding == "parallel"
        if self.parallel:
            if action_tokens_only:
                raise ValueError(f"{source or 'Policy'}: action_tokens_only=True restricts an autoregressive argmax; "
                                 f"this checkpoint's codec has decoding='parallel', head={self.spec.codec.head!r}")
            self.decode_params = stack_layers(params) if is_split(params) else params
        else:
            # The decoding layout (one array per layer: decode.split_layers); params in the stacked
            # training layout are split here (a copy; Policy.load splits and frees its freshly loaded ones).
            self.decode_params = params if is_split(params) else split_layers(params)
        # Sharded inference (vla_jax.policy.mesh): params placed over the mesh with training's rules.
        if mesh is not None and (len(self.spec.cameras) != 1 or self.spec.proprio_dim):
            raise ValueError(f"{source or 'Policy'}: sharded inference (mesh={mesh!r}) takes one camera and no "
                             f"proprio; this checkpoint has cameras={list(self.spec.cameras)}, "
                             f"proprio_dim={self.spec.proprio_dim}: load it without mesh=")
        self.mesh = None if mesh is None else policy_mesh.as_mesh(mesh)
        if self.mesh is not None:
            self.decode_params = jax.device_put(self.decode_params,
                                                policy_mesh.param_shardings(config, self.mesh, split=not self.parallel))
        self.norm_stats = {k: v for k, v in dict(norm_stats).items()}
        # {dataset name: DatasetConfig fields} the checkpoint trained on (its gripper convention).
        self.dataset_configs = {k: dict(v) for k, v in dict(dataset_configs or {}).items()}
        crop = self.spec.test_center_crop if center_crop is None else center_crop
        self._center_crop, self.action_tokens_only = bool(crop), bool(action_tokens_only)
        self.batch_buckets, self.prompt_bucket, self.source = tuple(buckets), int(prompt_bucket), source
        self.model = OpenVLA(config)
        self._allowed = (self.codec.first_id, self.codec.last_id) if action_tokens_only else None
        self._executables: Dict[Tuple[int, int, int], Any] = {}
        self.compile_seconds: Dict[Tuple[int, int, int], float] = {}
        self._compile_lock = threading.Lock()
        self._tf_image_fn = None

    @property
    def params(self):
        """The parameters in the stacked training/checkpoint layout (a new copy of the layer weights for
        autoregressive policies; parallel-decoding ones hold that layout already)."""
        return self.decode_params if self.parallel else stack_layers(self.decode_params)

    @property
    def codec(self) -> ActionCodec:
        """The action codec (ids <-> normalized <-> raw) of the checkpoint's spec."""
        return self.spec.codec

    @property
    def image_size(self) -> int:
        """Side of the square uint8 images the model sees (the spec's)."""
        return self.spec.image_size

    @property
    def center_crop(self) -> bool:
        """Whether images get the test-time 0.9-area center crop after resizing."""
        return self._center_crop

    @center_crop.setter
    def center_crop(self, value: bool) -> None:
        self._center_crop, self._tf_image_fn = bool(value), None

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, *, center_crop: Optional[bool] = None, action_tokens_only: bool = False,
             dtype: Optional[str] = None, param_dtype: Optional[str] = None, tokenizer: Optional[str] = None,
             compilation_cache: Union[None, bool, str] = None, device=None, mesh=None,
             device_memory: Optional[int] = None, **kw) -> "Policy":
        """Loads a vla_jax checkpoint (the latest step of a workdir) or an HF OpenVLA folder.

        center_crop: None = what the checkpoint's BatchSpec says (`test_center_crop`; for checkpoints without
          the `batch_spec` asset: its run config's data.image_aug with the random crop; HF folders: no crop).
        dtype / param_dtype: override the compute / parameter dtypes (e.g. 'bfloat16' on accelerators).
        tokenizer: a tokenizer.model to use instead of the checkpoint's.
        compilation_cache: see `enable_compilation_cache` (None = the environment variable decides).
        mesh: shard the parameters and run the decoder over a device mesh (`vla_jax.policy.mesh`): a
          jax Mesh with axes (data, fsdp, tensor), "D,F,T" or (D, F, T). Before any weight reaches a
          device, the mesh is checked against the sharded dimensions and the decoder is compiled for
          the smallest batch bucket and a 2 * prompt_bucket-token prompt; a program needing more than
          `device_memory` bytes per device (default: what the device reports; CPUs report nothing)
          raises ValueError with its per-device figure.
        """
        return load_policy(cls, path, center_crop=center_crop, action_tokens_only=action_tokens_only, dtype=dtype,
                           param_dtype=param_dtype, tokenizer=tokenizer, compilation_cache=compilation_cache,
                           device=device, mesh=mesh, device_memory=device_memory, **kw)

    # -- inputs ---------------------------------------------------------------------------------

    def check_image(self, image, index: int = 0) -> np.ndarray:
        """PIL image or uint8 [H, W, 3] array -> uint8 [H, W, 3]; ValueError otherwise (`inputs.check_image`)."""
        return inputs.check_image(image, index)

    def _image_fn(self):
        """The resize (+ test-time crop) TF function for this policy's image size and crop, built once."""
        if self._tf_image_fn is None:
            self._tf_image_fn = inputs.tf_image_fn(self.image_size, self.center_crop)
        return self._tf_image_fn

    def preprocess(self, images, camera: Optional[str] = None) -> np.ndarray:
        """B images (list or uint8 [B, H, W, 3]) -> uint8 [B, S, S, 3], exactly as training saw them."""
        return inputs.preprocess(images, self.image_size, self.center_crop, self._image_fn, camera)

    @property
    def cameras(self) -> Tuple[str, ...]:
        """The checkpoint's camera names, primary first (`BatchSpec.cameras`)."""
        return self.spec.cameras

    def pixel_shape(self, batch: int) -> Tuple[int, ...]:
        """Shape of the model's uint8 pixel input: [B, S, S, 3] for one camera, [B, N, S, S, 3] for N."""
        return (int(batch),) + self.spec.image_shape()

    def rows(self, observations, instructions):
        """`predict`'s inputs -> (per camera, its B images; raw state float64 [B, P] or None; B instructions):
        observation dicts (`vla_jax.policy.observation`), or bare images for a one-camera model."""
        return policy_obs.rows(observations, instructions, self.cameras, self.spec.proprio_dim)

    def model_inputs(self, per_cam, state: Optional[np.ndarray], unnorm_keys: Sequence[str]):
        """`rows` output -> (uint8 pixels `pixel_shape(B)`, normalized proprio float32 [B, P] or None).
        Each row's state is normalized with its own dataset's statistics (unnorm_keys[i], resolved) by
        upstream's inference-time rule (`vla_jax.policy.observation`)."""
        pix = [self.preprocess(imgs, cam if len(self.cameras) > 1 else None) for cam, imgs in zip(self.cameras, per_cam)]
        pixels = pix[0] if len(pix) == 1 else np.stack(pix, axis=1)
        if state is None:
            return pixels, None
        proprio = np.empty(state.shape, np.float32)
        for key in sorted(set(unnorm_keys)):
            idx = [i for i, k in enumerate(unnorm_keys) if k == key]
            proprio[idx] = policy_obs.normalize_state(state[idx], self.norm_stats[key], f"{key!r} statistics")
        return pixels, proprio

    def check_observation(self, obs: Mapping[str, Any]) -> Dict[str, Any]:
        """One observation dict (any accepted keys) -> {camera name: uint8 [H, W, 3], 'state': float64 [P]};
        ValueError naming the field otherwise. The server checks each request with it before batching."""
        per_cam, state = policy_obs.single(obs, self.cameras, self.spec.proprio_dim)
        out: Dict[str, Any] = {cam: inputs.check_image(im, 0, cam) for cam, im in zip(self.cameras, per_cam)}
        if state is not None:
            out["state"] = state
        return out

    def prompt_ids(self, instruction) -> List[int]:
        """Instruction (str or utf-8 bytes) -> `[BOS] + prompt + [29871]`; ValueError when empty or too long."""
        if isinstance(instruction, bytes):
            instruction = instruction.decode("utf-8", errors="strict")
        if not isinstance(instruction, str):
            raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
        if not instruction.strip():
            raise ValueError("instruction is empty")
        ids = self.tokenizer.inference_ids(instruction)
        limit = self.max_prompt_len()
        if len(ids) > limit:
            raise ValueError(f"instruction is {len(ids)} tokens long with the prompt; the model accepts at most {limit}")
        return ids

    def max_prompt_len(self, num_tokens: Optional[int] = None) -> int:
        """Most text tokens (BOS..29871) a prompt may have: max_seq_len - image patches of every camera -
        the proprio token (if any) - generated tokens (parallel decoding: - the K * D action slots - </s>)."""
        n = num_tokens if num_tokens is not None else self.default_num_tokens()
        prefix = getattr(self.config, "num_inserted_tokens",  # the model config's count (N x patches + proprio)
                         self.config.num_patches * len(self.cameras) + (1 if self.spec.proprio_dim else 0))
        return self.config.llama.max_seq_len - prefix - n

    # -- decoding -------------------------------------------------------------------------------

    def default_num_tokens(self) -> int:
        """Positions after the prompt: D generated tokens (autoregressive), or K * D slots + </s> (parallel)."""
        return self.codec.num_action_tokens + (1 if self.parallel else 0)

    def _decode_fn(self, num_tokens: int):
        """fn(params, pixels, ids, lengths[, proprio]) -> tokens; the proprio argument exists only when the
        spec has proprio."""
        if self.spec.proprio_dim:
            if self.parallel:
                return lambda p, x, i, l, s: parallel_decode(self.model, p, x, i, l, proprio=s)
            return lambda p, x, i, l, s: greedy_decode(self.model, p, x, i, l, num_tokens, self._allowed, proprio=s)
        if self.parallel:
            return lambda p, x, i, l: parallel_decode(self.model, p, x, i, l)
        return lambda p, x, i, l: greedy_decode(self.model, p, x, i, l, num_tokens, self._allowed)

    def _executable(self, num_tokens: int, batch: int, length: int):
        key = (num_tokens, batch, length)
        exe = self._executables.get(key)
        if exe is not None:
            return exe
        with self._compile_lock:
            if key not in self._executables:
                args = (self.decode_params, jax.ShapeDtypeStruct(self.pixel_shape(batch), np.uint8),
                        jax.ShapeDtypeStruct((batch, length), np.int32), jax.ShapeDtypeStruct((batch,), np.int32))
                if self.spec.proprio_dim:
                    args += (jax.ShapeDtypeStruct((batch, self.spec.proprio_dim), np.float32),)
                fn = jax.jit(self._decode_fn(num_tokens))
                log.info("compiling the decoder for batch %d, prompt length %d, %d tokens ...", batch, length,
                         num_tokens)
                t0 = time.perf_counter()
                if self.mesh is not None:
                    self._executables[key] = policy_mesh.compile_decoder(
                        self.model, self.decode_params, self.mesh, batch, length, num_tokens, self._allowed)
                else:
                    self._executables[key] = fn.lower(*args).compile()
                self.compile_seconds[key] = time.perf_counter() - t0
                log.info("compiled the decoder for batch %d, prompt length %d in %.1f s", batch, length,
                         self.compile_seconds[key])
            return self._executables[key]

    def buckets_for(self, batch: int, prompt_len: int, num_tokens: Optional[int] = None) -> Tuple[int, int]:
        """(padded batch, padded prompt length) a call with these sizes runs with."""
        n = num_tokens if num_tokens is not None else self.default_num_tokens()
        limit = self.max_prompt_len(n)
        length = min(-(-prompt_len // self.prompt_bucket) * self.prompt_bucket, limit)
        return bucket(batch, self.batch_buckets), max(length, prompt_len)

    def decode_tokens(self, pixels: np.ndarray, prompts: Sequence[Sequence[int]], num_tokens: int,
                      proprio: Optional[np.ndarray] = None) -> np.ndarray:
        """Preprocessed uint8 `pixel_shape(B)` (+ normalized proprio float32 [B, P] when the spec has it) + B prompt id lists -> greedy token ids int32 [B, num_tokens]
        (parallel decoding, num_tokens = K * D + 1: `parallel_decode`'s output, int32 token ids [B, K, D]
        for head 'tokens', float32 normalized actions [B, K, D] for head 'l1').

        Batches larger than the biggest bucket run in chunks of that size."""
        if self.parallel and num_tokens != self.default_num_tokens():
            raise ValueError(f"num_tokens={num_tokens}: a parallel-decoding checkpoint (codec chunk_size="
                             f"{self.codec.chunk_size}, head={self.codec.head!r}) always fills "
                             f"{self.codec.num_action_tokens} action slots + </s> = {self.default_num_tokens()}")
        b = len(prompts)
        if tuple(pixels.shape) != self.pixel_shape(b):
            raise ValueError(f"pixels have shape {list(pixels.shape)}; {b} prompts need {list(self.pixel_shape(b))} "
                             f"(cameras {list(self.cameras)})")
        p_dim = self.spec.proprio_dim
        if (proprio is None) != (not p_dim) or (p_dim and np.shape(proprio) != (b, p_dim)):
            raise ValueError("proprio must be " + (f"float32 [{b}, {p_dim}]" if p_dim else "None (the spec has no proprio)")
                             + f", got {None if proprio is None else list(np.shape(proprio))}")
        limit = self.max_prompt_len(num_tokens)
        longest = max(len(p) for p in prompts)
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens; at most {limit} fit next to the image and the actions")
        out, step = [], self.batch_buckets[-1]
        for lo in range(0, b, step):
            rows = list(range(lo, min(b, lo + step)))
            bb, length = self.buckets_for(len(rows), max(len(prompts[r]) for r in rows), num_tokens)
            rows_padded = rows + [rows[0]] * (bb - len(rows))  # pad rows: copies, dropped below
            ids = np.full((bb, length), self.tokenizer.pad_id, np.int32)
            lengths = np.zeros((bb,), np.int32)
            for i, r in enumerate(rows_padded):
                ids[i, :len(prompts[r])] = prompts[r]
                lengths[i] = len(prompts[r])
            extra = () if proprio is None else (np.asarray(proprio, np.float32)[rows_padded],)
            tokens = self._executable(num_tokens, bb, length)(self.decode_params, pixels[rows_padded], ids, lengths,
                                                              *extra)
            out.append(np.asarray(tokens)[:len(rows)])
        return np.concatenate(out, axis=0)

    # -- public prediction API ------------------------------------------------------------------
    # `observations`: B observation dicts (camera images by name, 'state' raw; see
    # vla_jax/policy/observation.py), one batched dict, or for one-camera models without proprio also
    # bare images (a list, uint8 [B, H, W, 3] or one [H, W, 3]); instructions: B strings or one for all.

    def _check_autoregressive(self, option: str) -> None:
        if self.parallel:
            raise ValueError(f"{option} needs an autoregressive checkpoint; this one's action codec has "
                             f"decoding='parallel', head={self.codec.head!r}, chunk_size={self.codec.chunk_size} "
                             f"(OpenVLA-OFT: one pass predicts the whole chunk)")

    def predict_tokens(self, observations, instructions, num_tokens: Optional[int] = None, *,
                       stop_at_eos: bool = False, unnorm_key: Optional[str] = None) -> np.ndarray:
        """B observations + B instructions -> int32 [B, num_tokens] (default: the codec's action tokens).
        stop_at_eos: rows with an early EOS get OpenVLA's ids instead (`upstream_eos_ids`). unnorm_key:
        the statistics a proprio state is normalized with. Parallel decoding with head 'tokens':
        int32 [B, K, D] (num_tokens and stop_at_eos are refused)."""
        if self.parallel:
            if num_tokens is not None:
                self._check_autoregressive(f"num_tokens={num_tokens}")
            if stop_at_eos:
                self._check_autoregressive("stop_at_eos=True")
            if self.codec.head != "tokens":
                self._check_autoregressive("predict_tokens (head 'l1' predicts no tokens)")
        per_cam, state, instructions = self.rows(observations, instructions)
        keys = [self.resolve_unnorm_key(unnorm_key)] * len(instructions) if state is not None else []
        pixels, proprio = self.model_inputs(per_cam, state, keys)
        prompts = [self.prompt_ids(s) for s in instructions]
        return self._tokens(pixels, proprio, prompts, num_tokens, stop_at_eos)

    def _tokens(self, pixels, proprio, prompts, num_tokens: Optional[int], stop_at_eos: bool) -> np.ndarray:
        if self.parallel:
            return self.decode_tokens(pixels, prompts, self.default_num_tokens(), proprio)
        tokens = self.decode_tokens(pixels, prompts, int(num_tokens or self.codec.num_action_tokens), proprio)
        if stop_at_eos:
            eos = self.tokenizer.tokenizer.eos_id
            tokens = np.stack([upstream_eos_ids(p, t, eos) for p, t in zip(prompts, tokens)])
        return tokens

    def predict(self, observations, instructions, unnorm_key: Union[None, str, Sequence[str]] = None,
                gripper: Union[str, Sequence[str]] = "openvla", *, stop_at_eos: bool = False) -> Prediction:
        """B observations + B instructions -> `Prediction` (tokens, normalized and raw actions): the one
        call the server and the evaluators use.

        unnorm_key: one dataset key for every row (None: the only one) or B keys; each row decodes as
          many tokens as the largest action dim among them (greedy decoding is causal: a row's first d
          tokens are the same as a d-token decode) and is un-normalized with its own statistics (its
          proprio state, if any, normalized with them too).
        gripper: 'openvla' (1 = open, 0 = closed, as OpenVLA returns it) or 'dataset' (the convention the
          dataset was registered with; see `vla_jax.spec.gripper`), for every row or B of them.
        stop_at_eos: upstream's early-EOS decoding, for parity studies (see `predict_action`)."""
        per_cam, state, instructions = self.rows(observations, instructions)
        b = len(instructions)
        keys = [self.resolve_unnorm_key(k) for k in _per_row(unnorm_key, b, "unnorm_key")]
        grippers = _per_row(gripper, b, "gripper")
        for key, g in sorted(set(zip(keys, grippers))):
            self.check_gripper(g, key)  # before decoding: a non-invertible convention fails fast
        dims = [self.action_dim(k) for k in keys]
        prompts = [self.prompt_ids(s) for s in instructions]
        if self.parallel:
            if stop_at_eos:
                self._check_autoregressive("stop_at_eos=True")
            d = self.codec.action_dim
            bad = sorted({(k, n) for k, n in zip(keys, dims) if n != d})
            if bad:
                raise ValueError(f"the statistics of {[k for k, _ in bad]} have action dims {[n for _, n in bad]}, "
                                 f"but this parallel-decoding checkpoint predicts chunks of action_dim={d} (codec)")
        elif stop_at_eos and len(set(dims)) > 1:
            raise ValueError(f"stop_at_eos needs one action dim for all rows; the keys {sorted(set(keys))} have "
                             f"{sorted(set(dims))}")
        pixels, proprio = self.model_inputs(per_cam, state, keys)
        out = self._tokens(pixels, proprio, prompts, max(dims), stop_at_eos)
        if self.parallel and self.codec.head != "tokens":
            tokens, normalized = None, np.asarray(out, np.float64)  # the L1 head's normalized chunk [B, K, D]
        else:
            tokens = np.asarray(out, np.int32)
            normalized = self.codec.decode(tokens)
        rows: List[Any] = [None] * b
        for key, g, d in sorted(set(zip(keys, grippers, dims))):
            idx = [i for i in range(b) if keys[i] == key and grippers[i] == g]
            part = normalized[idx] if self.parallel else normalized[idx, :d]
            raw = self.convert_gripper(self.unnormalize(part, key), key, g)  # [n, d] or chunks [n, K, D]
            for j, i in enumerate(idx):
                rows[i] = raw[j]
        return Prediction(tokens, normalized, tuple(rows), tuple(keys))

    def predict_actions(self, observations, instructions, unnorm_key: Optional[str] = None,
                        gripper: str = "openvla", *, stop_at_eos: bool = False) -> np.ndarray:
        """B observations + B instructions -> float64 [B, action_dim] ([B, K, action_dim] for
        parallel-decoding checkpoints; `predict(...).actions`; gripper and stop_at_eos as there)."""
        return self.predict(observations, instructions, unnorm_key, gripper, stop_at_eos=stop_at_eos).actions

    def predict_action(self, observation, instruction: str, unnorm_key: Optional[str] = None,
                       gripper: str = "openvla", *, stop_at_eos: bool = False) -> np.ndarray:
        """One observation + instruction -> float64 [action_dim] (gripper: see `predict_actions`). The
        observation: a uint8 RGB image [H, W, 3] (or PIL image) for a one-camera model, or a dict of camera
        images by name plus the raw proprio 'state' [P] (OpenVLA-OFT's `full_image` / `wrist_image` /
        `state` work too; vla_jax/policy/observation.py). For a parallel-decoding (OpenVLA-OFT) checkpoint:
        the whole chunk, float64 [K, action_dim] ([1, action_dim] when K = 1), the first row the action for now.

        Differs from OpenVLA's `predict_action` in one case, on purpose: when the model emits EOS
        before the last action token, upstream's `generate` stops there and upstream decodes the last
        action_dim ids of the whole sequence (prompt ids included, EOS too); vla_jax always decodes
        the action_dim generated positions. `stop_at_eos=True` gives upstream's result, for parity
        studies (`upstream_eos_ids`). Without an early EOS both agree.
        """
        return self.predict_actions([observation], [instruction], unnorm_key, gripper, stop_at_eos=stop_at_eos)[0]

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_lengths: Optional[Sequence[int]] = None,
               num_tokens: Optional[int] = None) -> Dict[Tuple[int, int, int], float]:
        """Compiles the buckets serving these batch sizes and prompt lengths (default: the length of a
        typical instruction). Returns {(tokens, batch, length): compile seconds} of the new ones."""
        n = int(num_tokens or self.default_num_tokens())
        if prompt_lengths is None:
            prompt_lengths = [len(self.tokenizer.inference_ids(_WARMUP_INSTRUCTION))]
        before = set(self.compile_seconds)
        for b in batch_sizes:
            for length in prompt_lengths:
                bb, lb = self.buckets_for(int(b), int(length), n)
                self._executable(n, bb, lb)
        return {k: v for k, v in self.compile_seconds.items() if k not in before}

    def describe(self) -> Dict[str, Any]:
        """JSON-able summary (served by GET /health)."""
        return {"source": self.source, "image_size": self.image_size, "cameras": list(self.cameras),
                "proprio_dim": self.spec.proprio_dim, "action_dim": self.codec.action_dim,
                "decoding": self.codec.decoding, "head": self.codec.head, "chunk_size": self.codec.chunk_size,
                "unnorm_keys": self.unnorm_keys, "center_crop": self.center_crop,
                "action_tokens_only": self.action_tokens_only, "batch_buckets": list(self.batch_buckets),
                "compiled_buckets": [list(k) for k in sorted(self._executables)],
                "dtype": self.config.dtype, "mesh": None if self.mesh is None else dict(self.mesh.shape)}
