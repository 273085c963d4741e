"""HF OpenVLA checkpoints (`openvla/openvla-7b` format) <-> vla_jax, streamed at 7B scale.

  load_hf_dir(path, mesh=None, shardings=None)  -> (OpenVLAConfig, params, norm_stats, tokenizer_path)
  load_hf_params(path, abstract_params, expect_config=None) -> params   (training init_from=HF_DIR)
  is_hf_dir(path)                                -> bool
  import_hf(hf_dir, out_dir)                     HF folder -> vla_jax workdir (orbax + assets)
  import_base(dino, siglip, llm_dir, out_dir)    timm towers + HF Llama-2 -> vla_jax workdir
  export_params(params, cfg, out_dir)            in-memory params -> HF folder
  export_checkpoint(ckpt, out_dir)               vla_jax checkpoint -> HF folder
  oft_io.import_oft / oft_io.export_oft          released OpenVLA-OFT folder <-> vla_jax checkpoint
CLI: `python -m vla_jax.hf {import,import-base,export,import-oft,export-oft} ...` (see `python -m vla_jax.hf --help`).
"""

from vla_jax.hf.exporter import export_checkpoint, export_params, export_plan  # noqa: F401
from vla_jax.hf.importer import is_hf_dir, load_hf_dir, load_hf_params  # noqa: F401
from vla_jax.hf.import_checkpoint import import_base, import_hf  # noqa: F401
