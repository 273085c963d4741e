"""OpenVLA-7B pretraining on the Open X-Embodiment "magic soup++ minus" mixture.

    python train.py --config=configs/oxe.py --workdir=gs://BUCKET/runs/openvla \
        --config.data_dir=gs://BUCKET/oxe --config.tokenizer=PATH/tokenizer.model

Hyperparameters are OpenVLA's (OPENVLA_REFERENCE.md §7: prismatic/conf/vla.py,
Exp_DinoSigLIP_224px_OXE_Magic_Soup_Plus, and the FSDP strategy's AdamW).

Planned for a TPU v5p-128 slice (64 chips): FSDP over all 64, 32 examples per chip, as OpenVLA's 64
GPUs x 32. The TPU compiler's plan (`python -m vla_jax.plan --config=configs/oxe.py --topology=v5p-128`,
BENCHMARKS.md "TPU plans"): 15.6 GB peak per chip of the 95 GB HBM; 1.44 s/step at the compute roofline,
2.85 s at 40% MFU, i.e. ~10 days for OpenVLA's 295k steps. The state needs >= 90 GB in all (fp32 weights
+ Adam), so slices with less HBM in total cannot hold it at any batch.
"""

from configs.common import base_config


def get_config(arg=None):
    c = base_config()

    c.model.preset = "openvla-7b"   # DINOv2-L/14-reg4 + SigLIP-So400m/14 @224, fused MLP projector, Llama-2-7B
    c.model.dtype = "bfloat16"      # FSDP MixedPrecision(param_dtype=bf16) + autocast(bf16)
    c.model.param_dtype = "float32"  # train.py asserts fp32 master weights
    c.model.remat = True            # non-reentrant activation checkpointing on every LlamaDecoderLayer

    c.data_source = "rlds"
    c.data.data_dir = ""            # set with --config.data.data_dir (folder of the OXE TFDS builders)
    c.data.mixture = "oxe_magic_soup_plus_minus"  # the final stage (DROID removed)
    c.data.image_aug = False        # the released openvla-7b was trained without augmentation
    c.data.shuffle_buffer = 256_000  # frames per rank (here: per host)
    c.data.max_seq_len = 128        # OpenVLA pads per batch (<= 2048); a fixed length long enough for OXE prompts
    c.data.ram_budget_gb = 1.0      # OpenVLA's tf.data autotune budget

    c.global_batch_size = 2048      # 64 GPUs x 32 per device, no accumulation
    c.grad_accum_steps = 1
    c.num_steps = 300_000           # OpenVLA never stops on its own; the release is step 295k
    c.save_every = 2500             # OpenVLA's save_interval
    c.keep_checkpoints = 3
    c.log_every = 10

    c.optim.learning_rate = 2e-5    # constant, no warmup (warmup_ratio 0.0)
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults
    c.optim.weight_decay = 0.0      # both param groups use 0
    c.optim.grad_clip = 1.0         # max_grad_norm (FSDP clip_grad_norm_)

    c.freeze.vision = False         # stage vla-full-train: everything trains, the vision towers included
    c.freeze.projector = False
    c.freeze.llm = False

    # Full FSDP over every device of the slice (ZeRO-3): 7.5B fp32 params + Adam = 90 GB sharded
    # (on v5p-128: 1.41 GB per chip; the rest of the 15.6 GB peak is activations and gradients).
    # On GPU nodes OpenVLA used HYBRID_SHARD (shard within 8 GPUs, replicate across nodes):
    # --config.mesh.data=-1 --config.mesh.fsdp=8.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.seed = 7
    return c
