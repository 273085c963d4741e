"""Fine-tune a pretrained OpenVLA on one dataset; optionally OpenVLA's LoRA recipe or frozen parts.

    python train.py --config=configs/finetune.py:dataset=bridge_orig,lora=True --workdir=runs/ft \
        --config.init_from=PATH/openvla-7b --config.data.data_dir=PATH/data --config.tokenizer=PATH/tokenizer.model

Arguments (after the colon): dataset=<registered name>, lora=True|False, freeze_vision=True|False,
freeze_llm=True|False. Values: OPENVLA_REFERENCE.md §9 (vla-scripts/finetune.py) for LoRA; full
fine-tuning keeps the pretraining optimizer (§7).
"""

from ml_collections import config_dict

from configs.common import base_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dataset="bridge_orig", lora=False, freeze_vision=False, freeze_llm=False)
    c = base_config()

    c.model.preset = "openvla-7b"
    c.model.dtype = "bfloat16"      # finetune.py loads the model in bf16 and trains under bf16 autocast
    c.model.remat = True
    # Required (train.py stops without it): a vla_jax checkpoint or an HF OpenVLA folder.
    c.init_from = config_dict.placeholder(str)

    c.data.mixture = a["dataset"]
    c.data.image_aug = True         # finetune.py: image_aug=True
    c.data.shuffle_buffer = 100_000  # finetune.py: shuffle_buffer_size=100_000
    c.data.max_seq_len = 128

    c.global_batch_size = 16        # finetune.py: batch_size=16 per GPU, one GPU
    c.grad_accum_steps = 1          # grad_accumulation_steps=1
    c.num_steps = 200_000           # max_steps
    c.save_every = 5000             # save_steps
    c.log_every = 10                # W&B every 10 steps

    if a["lora"]:
        c.model.param_dtype = "bfloat16"  # finetune.py loads the frozen base in bf16 (adapters: fp32, lora.py)
        c.lora.enabled = True
        c.lora.rank = 32            # LoraConfig(r=32)
        c.lora.alpha = 16.0         # lora_alpha=min(r, 16): scale alpha / r = 0.5
        c.optim.learning_rate = 5e-4  # AdamW(lr=5e-4), constant
        c.optim.schedule = "constant"
        c.optim.weight_decay = 0.01   # torch AdamW's default weight_decay (finetune.py passes none)
        c.optim.grad_clip = 0.0       # finetune.py does not clip gradients
    else:
        c.optim.learning_rate = 2e-5  # the pretraining run's constant lr (§7)
        c.optim.weight_decay = 0.0
        c.optim.grad_clip = 1.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # torch.optim.AdamW defaults

    c.freeze.vision = a["freeze_vision"]  # the paper's "frozen vision" variant (Table 1)
    c.freeze.llm = a["freeze_llm"]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c
