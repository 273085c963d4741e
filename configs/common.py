"""Every key a training run reads, with its meaning. The run configs (oxe.py, finetune.py, debug.py)
start from `base_config()` and set what they need, each value with its source.

Configs are locked by train.py: `--config.optim.lr=...` (a typo for learning_rate) is an error.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model geometry: a preset of vla_jax/models/config.py, with dtypes and rematerialisation.
    c.model = ml_collections.ConfigDict(dict(
        preset="openvla-7b",
        dtype="bfloat16",       # compute dtype (norms, softmax, logits and loss stay fp32)
        param_dtype="float32",  # master weights
        remat=True,             # activation checkpointing per transformer block
        image_size=0,           # 0: the preset's (224); smaller trains faster on CPU (tiny models only)
        # OpenVLA-OFT (configs/oft.py): one bidirectional pass predicts chunk_size x 7 action values.
        # chunk_size must equal data.action_chunk; action_head 'tokens' (256-bin CE) or 'l1'
        # (continuous head, L1 loss); both need parallel_decoding=True.
        parallel_decoding=False,
        chunk_size=1,
        action_head="tokens",
        # Inputs (OpenVLA-OFT §7): camera images per example (must equal data.cameras; their patches
        # follow BOS in camera order) and the proprio size P (0: none; P > 0 adds one proprio token
        # after the patches and needs data.use_proprio=True with a P-dimensional state).
        num_images=1,
        proprio_dim=0,
        # OFT+'s FiLM (vla_jax/models/film.py): each tower block modulated by the mean raw prompt
        # embedding (params['film'], trained in full beside LoRA); needs parallel_decoding=True.
        film=False,
    ))

    # Input. data_source 'rlds' is the real pipeline (vla_jax/data/pipeline.py); 'synthetic' gives
    # random batches of the same structure (tests, benchmarks, capacity planning).
    c.data_source = "rlds"
    c.tokenizer = ""  # Llama-2 SentencePiece tokenizer.model
    c.data = ml_collections.ConfigDict(dict(
        data_dir="",            # folder holding the TFDS builder folders
        mixture="",             # a mixture name (vla_jax/data/oxe/mixtures.py) or one dataset name
        split="train",
        image_aug=False,
        # OpenVLA's augmentation ops, in its order (image_aug=True applies these; a subset skips the rest).
        image_aug_ops=("random_resized_crop", "random_brightness", "random_contrast", "random_saturation",
                       "random_hue"),
        shuffle_buffer=256_000,  # frames per host (still JPEG-encoded)
        max_seq_len=64,         # text tokens per example (BOS..EOS + padding), image patches not counted
        threads=config_dict.placeholder(int),           # tf.data thread pool (None: TF's default)
        ram_budget_gb=1.0,      # tf.data autotune RAM budget per host
        dataset_configs=config_dict.placeholder(str),   # extra dataset/mixture registrations (.json/.py)
        stats_cache_dir=config_dict.placeholder(str),   # where statistics go if data_dir is read-only
        deterministic=True,     # order depends only on the seed: exact resume by replay
        balance_weights=True,   # mixture weights x num_transitions (OpenVLA)
        # Actions per frame: 1 is OpenVLA; K > 1 is OpenVLA-OFT's chunk of actions t..t+K-1 (LIBERO: 8),
        # chunks start only where a full chunk exists, shorter episodes are dropped (and counted).
        # max_seq_len must then hold the prompt plus K x 7 action tokens (K=8: 128 is enough).
        action_chunk=1,
        # Cameras per frame: the first N of each dataset's image_keys (primary first). 1: pixel_values
        # [B, S, S, 3] (OpenVLA); N > 1: [B, N, S, S, 3], each camera augmented with its own seed
        # (OpenVLA-OFT LIBERO: 2, image + wrist_image).
        cameras=1,
        # Add batch key 'proprio' float32 [B, P]: each dataset's proprio_key state, BOUNDS_Q99-normalized
        # with its proprio statistics (computed and cached with the action statistics).
        use_proprio=False,
    ))
    c.synthetic = ml_collections.ConfigDict(dict(num_datasets=1, palette=0))  # data_source='synthetic' only

    # Batch and schedule. global_batch_size counts examples per optimizer step over all hosts;
    # grad_accum_steps splits it into micro-batches inside the jitted step.
    c.global_batch_size = 8
    c.grad_accum_steps = 1
    c.num_steps = 1000
    c.save_every = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.log_every = 1  # metrics are computed every step; written every log_every steps
    # Optimizer steps per compiled call (lax.scan over the step; the same updates). > 1 saves the
    # per-call cost: host dispatch and, on CPU, XLA's temporary buffer, which is mapped and
    # zero-filled afresh by the OS on every call ('mid' preset on 2 CPU cores: see BENCHMARKS.md).
    # Checkpoints still land on save_every and num_steps (single-step calls fill the gaps); a
    # preemption is answered at the end of the current call.
    c.steps_per_call = 1

    # AdamW, every hyperparameter explicit (optax's defaults differ from torch's and OpenVLA's).
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=2e-5,
        schedule="constant",    # constant | warmup_constant | warmup_cosine | step
        warmup_steps=0,
        end_lr_fraction=0.0,    # warmup_cosine only: final lr = fraction x learning_rate
        decay_steps=0,          # step only: lr x decay_factor from this step on (torch MultiStepLR, one milestone)
        decay_factor=0.1,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,          # global-norm clip; <= 0 disables
    ))

    # What trains. Unused vision parameters (last ViT blocks, final norms, SigLIP's MAP head) never train.
    c.freeze = ml_collections.ConfigDict(dict(vision=False, projector=False, llm=False))
    # LoRA adapters (vla_jax/models/lora.py): when enabled, only the adapters train.
    c.lora = ml_collections.ConfigDict(dict(enabled=False, rank=32, alpha=16.0))
    # Start from: '' (random init), a vla_jax checkpoint (workdir, checkpoints/ or a step folder),
    # or an HF OpenVLA folder (needs vla_jax.hf). Ignored when the workdir already has a checkpoint.
    c.init_from = ""

    # Device mesh (data, fsdp, tensor); one size may be -1 (the rest of the devices).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.seed = 7

    c.log = ml_collections.ConfigDict(dict(
        tensorboard=True,
        wandb_project="",  # non-empty: log to Weights & Biases (if installed)
        progress=True,     # tqdm bar on the terminal
    ))
    c.compile_cache_dir = ""  # persistent XLA compilation cache (restarts skip compilation)
    return c


def parse_arg(arg: str, **defaults):
    """'dataset=bridge_orig,lora=True' -> dict, values typed like `defaults` (unknown keys are errors)."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} must look like key=value")
        k, v = item.split("=", 1)
        if k not in defaults:
            raise ValueError(f"unknown config argument {k!r}; known: {sorted(defaults)}")
        d = defaults[k]
        if isinstance(d, bool):
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {k}={v!r} must be True or False")
            out[k] = v.lower() in ("true", "1")
        else:
            out[k] = type(d)(v)
    return out
