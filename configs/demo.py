"""`make demo`: a ~3.2M-parameter OpenVLA trained from scratch on the Meta-World demo dataset, on CPU.

    python train.py --config=configs/demo.py --workdir=DIR \\
        --config.tokenizer=TOK/tokenizer.model --config.data.data_dir=DATA \\
        --config.data.dataset_configs=DATA/dataset_config.json

`python -m vla_jax.demo` fills in those paths (data from vla_jax.sim.demos, tokenizer from
vla_jax/demo.py's small SentencePiece model) and the number of steps from its time budget.

Geometry: the OpenVLA architecture at demo scale (DINOv2-reg + SigLIP towers of width 128, patch 16
on 64x64 images; Llama width 256 x 2 layers) over a 512-piece demo tokenizer whose last 256 ids are
the action bins: the 'demo' preset of vla_jax/models/config.py.
"""

from configs.common import base_config, parse_arg
from vla_jax.sim.observation import PROPRIO_DIM

DEMO_DATASET = "metaworld_demo"
DEMO_PROPRIO_DIM = PROPRIO_DIM  # the demo data's state: hand x, y, z and gripper opening


def get_config(arg=None):
    """arg: 'steps=N,batch=B,recipe=openvla|oft,chunk=K,head=l1|tokens,cameras=N,proprio=0|1' (defaults
    3000, 64, openvla, 8, l1, 1, 0).

    recipe=oft: OpenVLA-OFT's model side at demo scale (configs/oft.py): parallel decoding of a chunk of
    K actions (the data carries K actions per frame), head 'l1' (continuous, L1 loss) or 'tokens'
    (256-bin CE). The optimizer stays the demo's (a from-scratch model, not OFT's LoRA fine-tune).
    cameras=2: the demo data's wrist camera as well (make_demo_data --wrist_camera; the model reads both
    images); proprio=1: the 4-D proprio state (make_demo_data --proprio: hand xyz + gripper opening) as
    one token. Both work with either recipe."""
    args = parse_arg(arg, steps=3000, batch=64, recipe="openvla", chunk=8, head="l1", cameras=1, proprio=0)
    if args["recipe"] not in ("openvla", "oft"):
        raise ValueError(f"configs/demo.py: recipe={args['recipe']!r}; expected 'openvla' or 'oft'")
    if args["cameras"] not in (1, 2):
        raise ValueError(f"configs/demo.py: cameras={args['cameras']}; the demo data has 1 (primary) or 2 "
                         f"(primary + wrist) cameras")
    if args["proprio"] not in (0, 1):
        raise ValueError(f"configs/demo.py: proprio={args['proprio']}; expected 0 (off) or 1 (the 4-D demo state)")
    c = base_config()

    c.model.preset = "demo"
    c.model.dtype = "float32"       # CPU: bf16 matmuls are emulated and slower
    c.model.remat = False
    c.model.image_size = 0          # the preset's 64 px

    c.data_source = "rlds"
    c.tokenizer = ""                # set by vla_jax.demo (built there, cached)
    c.data.data_dir = ""            # set by vla_jax.demo: the generated demo dataset
    c.data.dataset_configs = ""     # ... and its dataset_config.json
    c.data.mixture = DEMO_DATASET
    c.data.image_aug = True         # OpenVLA's random crop + colour jitter: closed-loop success needs it
    c.data.shuffle_buffer = 20_000  # the whole demo dataset (~20k frames at 64 px) fits
    # BOS + prompt + space + 7 actions + EOS: the demo tokenizer makes the prompt template two pieces,
    # so the six demo tasks' prompts are 5-9 pieces (16 at most over all 50 Meta-World tasks).
    c.data.max_seq_len = 20
    if args["recipe"] == "oft":
        k = args["chunk"]
        c.model.parallel_decoding = True
        c.model.chunk_size = k
        c.model.action_head = args["head"]
        c.data.action_chunk = k
        c.data.max_seq_len = 20 + 7 * (k - 1)  # K x 7 action tokens instead of 7
    c.model.num_images = c.data.cameras = args["cameras"]
    if args["proprio"]:
        c.model.proprio_dim = DEMO_PROPRIO_DIM
        c.data.use_proprio = True
    c.data.threads = 2
    c.data.ram_budget_gb = 1.0

    c.global_batch_size = args["batch"]
    c.num_steps = args["steps"]
    c.save_every = max(1, args["steps"] // 2)
    c.keep_checkpoints = 1
    c.async_checkpoints = False
    c.log_every = 10

    c.optim.learning_rate = 5e-4    # small model from scratch (measured with a prototype: 3e-4..5e-4)
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = max(1, min(200, args["steps"] // 10))
    c.optim.end_lr_fraction = 0.05
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.log.tensorboard = False
    c.log.progress = True
    return c
