"""A tiny OpenVLA on the 25 real Bridge debug episodes: seconds per step on a laptop CPU.

    python train.py --config=configs/debug.py --workdir=/tmp/vla_debug

The data and tokenizer are the real ones shipped in tests/fixtures/data (25+25 BridgeData V2
episodes, the Llama-2 tokenizer; licences there), found from this file's location, so the config
works from any working directory; override with --config.data.data_dir and --config.tokenizer.
"""

import pathlib

from configs.common import base_config

_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data"


def get_config(arg=None):
    c = base_config()

    c.model.preset = "debug"        # Llama width 128 x 2 layers, ViTs width 64 x 3, real 32064-row vocabulary
    c.model.dtype = "float32"       # CPU: bf16 matmuls are emulated and slower
    c.model.remat = False
    c.model.image_size = 112        # the debug images are 64x64; 112 px = 8x8 patches keeps steps fast

    c.data_source = "rlds"
    c.tokenizer = str(_FIXTURES / "llama2_tokenizer" / "tokenizer.model")
    c.data.data_dir = str(_FIXTURES / "bridge_debug")
    c.data.mixture = "bridge_dataset"  # the builder folder's name (bridge_orig's transforms)
    c.data.shuffle_buffer = 1000
    c.data.max_seq_len = 40         # the 4 debug instructions need <= 34 tokens
    c.data.threads = 2

    c.global_batch_size = 8
    c.num_steps = 200
    c.save_every = 50
    c.keep_checkpoints = 2

    c.optim.learning_rate = 1e-3    # small model from scratch: much higher than OpenVLA's 2e-5
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0

    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.log.tensorboard = True
    return c
