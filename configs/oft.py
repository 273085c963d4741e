"""OpenVLA-OFT fine-tuning (parallel decoding, action chunks, L1 head): the LIBERO recipe.

    python train.py --config=configs/oft.py:dataset=libero_spatial_no_noops,head=l1,chunk=8 --workdir=runs/oft \
        --config.init_from=PATH/openvla-7b --config.data.data_dir=PATH/data --config.tokenizer=PATH/tokenizer.model

Arguments (after the colon): dataset=<registered name> (default libero_spatial_no_noops),
head=l1|tokens (continuous L1 head, upstream's default, or the 256-bin token head), chunk=K (actions
per prediction, LIBERO 8), steps=N (LIBERO Spatial/Object/10: 150005; Goal: 50000), decay=N (the step
of the x0.1 learning-rate drop; LIBERO 100000), cameras=N (LIBERO OFT: 2, the third-person `image` and
the `wrist_image`; 1 = third person only, the paper's "3rd-person" rows), proprio=P (LIBERO OFT: 8,
`state[:6] + state[-2:]`; 0 = no proprio token), film=0|1 (OFT+'s FiLM, §8: 1 modulates every tower
block with the mean raw embedding of the prompt; upstream uses it for ALOHA's language following).
Values: OFT_REFERENCE.md §9 ("Training recipe"; FT = upstream vla-scripts/finetune.py,
LIBERO.md = upstream's LIBERO instructions, PAPER = the OFT paper).

The released LIBERO checkpoints (97.1%) use 3rd-person + wrist images and the 8-D proprio, no FiLM
(§6, §9 table: "Inputs"): those are the defaults here. The patches of both images follow BOS, then one
proprio token (§7). FiLM is off by default, as in the LIBERO checkpoints; with film=1 the FiLM linears
(456M at 7B) train in full beside LoRA, as upstream's wrapper installed after get_peft_model. What
differs from upstream with FiLM: its training average of the prompt embeddings also counts right-pad
tokens; ours never does (the same vector a row gets alone at inference, where upstream has no pads). The L1 head reads the
readout states exactly as upstream (§4-§6). LoRA covers what PEFT's "all-linear" covers (every Linear
of both towers, the projector and the LLM incl. lm_head, plus the patch-embed convs; vla_jax/models/lora.py);
the L1 head and the proprio projector train in full beside it, as upstream.

Planned for (BENCHMARKS.md "OpenVLA-OFT single pass ... and the OFT LoRA step on one chip"): training
at 8 examples per device on one accelerator of >= 40 GB (upstream: 8 GPUs x 8), checked with the TPU
compiler by `python -m vla_jax.plan --config=configs/oft.py:cameras=1,proprio=0 --topology=v5p:1x1x1 --batch=8 --budget_gb=40`;
serving on a v5e-4 slice, tensor-parallel (`--program=oft_predict --topology=v5e-4`): one v5e chip
barely holds the 15.4 GB of bf16 weights.
"""

from ml_collections import config_dict

from configs.common import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dataset="libero_spatial_no_noops", head="l1", chunk=8, steps=150_005, decay=100_000,
                  cameras=2, proprio=8, film=0)
    c = base_config()

    c.model.preset = "openvla-7b"
    c.model.dtype = "bfloat16"        # forward under torch.autocast(bf16) (§9 Precision, FT:327)
    c.model.param_dtype = "bfloat16"  # base weights loaded in bf16 (FT:835-840); adapters fp32 (lora.py)
    c.model.remat = True
    c.model.parallel_decoding = True  # one bidirectional pass over the zeroed action slots (§2-§3)
    c.model.chunk_size = a["chunk"]   # LIBERO: K=8 (§9 per-platform table, LIBERO.md:96-126)
    c.model.action_head = a["head"]   # use_l1_regression=True by default (FT:69-119) -> 'l1'
    c.model.num_images = a["cameras"]  # num_images_in_input=2 for LIBERO OFT (§7; LIBERO.md:104-108)
    c.model.proprio_dim = a["proprio"]  # use_proprio, PROPRIO_DIM=8 for LIBERO (§1, §7)
    if a["film"] not in (0, 1):
        raise ValueError(f"configs/oft.py: film={a['film']!r}; expected 0 (off) or 1 (OFT+'s FiLM)")
    c.model.film = bool(a["film"])    # use_film (FT:857-872; §8)
    c.init_from = config_dict.placeholder(str)  # required: an OpenVLA checkpoint (HF folder or vla_jax)

    c.data.mixture = a["dataset"]
    c.data.action_chunk = a["chunk"]  # must equal model.chunk_size (train.py checks)
    c.data.cameras = a["cameras"]     # image + wrist_image (the LIBERO registry entries' image_keys)
    c.data.use_proprio = a["proprio"] > 0  # the registry's proprio_key 'state', dims [:6] + [-2:]
    c.data.image_aug = True           # image_aug=True (FT:69-119); ops as OpenVLA's: crop 0.9 area ratio 1,
    #                                   brightness 0.2, contrast/saturation [0.8, 1.2], hue 0.05 (§9 DS:151-165)
    c.data.shuffle_buffer = 100_000   # upstream finetune.py's shuffle_buffer_size (as configs/finetune.py)
    c.data.max_seq_len = 128          # prompt + K x 7 action tokens + </s> (K=8: 57 + the LIBERO prompts)

    c.global_batch_size = 64          # 8 GPUs x 8 per GPU (§9 table, LIBERO.md:96-126)
    c.grad_accum_steps = 1            # grad_accumulation_steps=1 (FT default)
    c.num_steps = a["steps"]          # --max_steps 150005 (Goal: 50000) (§9 table)
    c.save_every = 10_000             # save_freq 10k (FT:69-119)
    c.log_every = 10

    c.lora.enabled = True
    c.lora.rank = 32                  # r=32 (FT:769, 845-855)
    c.lora.alpha = 16.0               # lora_alpha=min(r, 16): scale 0.5 (FT:845-855)

    c.optim.learning_rate = 5e-4      # lr 5e-4 (FT:69-119; §9 table)
    c.optim.schedule = "step"         # MultiStepLR x0.1 at num_steps_before_decay (FT:941-945)
    c.optim.decay_steps = a["decay"]  # LIBERO: 100k (5e-4 -> 5e-5) (§9 table)
    c.optim.decay_factor = 0.1
    c.optim.warmup_steps = 0          # upstream's optional warmup defaults to off (FT:90-91, 1077-1082)
    c.optim.weight_decay = 0.01       # torch.optim.AdamW default (FT:927-935)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults (FT:927-935)
    c.optim.grad_clip = 0.0           # no gradient clipping (FT:927-935)

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # upstream: DDP; here FSDP (same math)
    return c
