"""Command line: `python -m vla_jax.hf {import,import-base,export,import-oft,export-oft} ...`.

  import HF_DIR OUT_DIR        HF OpenVLA folder (openvla/openvla-7b format) -> vla_jax workdir
  import-base OUT_DIR --dino=F --siglip=F --llm=DIR    timm towers + HF Llama-2 -> vla_jax workdir
  export CKPT OUT_DIR          vla_jax checkpoint (workdir / checkpoints / step folder) -> HF folder
  import-oft OFT_DIR OUT_DIR --chunk_size=K --cameras=A,B    released OpenVLA-OFT folder -> vla_jax workdir
  export-oft CKPT OUT_DIR      vla_jax OpenVLA-OFT checkpoint -> the OFT layout (safetensors)

Errors in the input (missing files, wrong keys or shapes, another model type) end with a one-line
message naming the file and keys involved, exit status 2, and no output folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla_jax.hf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="also show third-party INFO logs (absl/orbax/jax)")

    imp = sub.add_parser("import", parents=[common], help="HF OpenVLA folder -> vla_jax orbax checkpoint with assets")
    imp.add_argument("hf_dir", help="HF OpenVLA folder (or a Prismatic .pt with --allow_pickle)")
    imp.add_argument("out_dir", help="output workdir (OUT/checkpoints/0/...)")
    imp.add_argument("--param_dtype", default="checkpoint", choices=["checkpoint", "float32", "bfloat16"],
                     help="dtype of the stored params; 'checkpoint' keeps the file's (bf16 for openvla-7b: 15 GB)")
    imp.add_argument("--tokenizer", help="tokenizer.model to embed (default: the one in HF_DIR)")
    imp.add_argument("--allow_pickle", action="store_true",
                     help="accept a PyTorch .pt (Prismatic format); read with a restricted unpickler")
    imp.add_argument("--hf_config", help="with --allow_pickle: an HF OpenVLA config.json describing the model")
    imp.add_argument("--overwrite", action="store_true")

    base = sub.add_parser("import-base", parents=[common], help="timm DINOv2 + SigLIP and HF Llama-2 -> vla_jax checkpoint")
    base.add_argument("out_dir")
    base.add_argument("--dino", required=True, help="timm vit_large_patch14_reg4_dinov2 model.safetensors")
    base.add_argument("--siglip", required=True, help="timm vit_so400m_patch14_siglip_224 model.safetensors")
    base.add_argument("--llm", required=True, help="HF Llama-2 folder (config.json, *.safetensors)")
    base.add_argument("--image_size", type=int, default=224)
    base.add_argument("--param_dtype", default="checkpoint", choices=["checkpoint", "float32", "bfloat16"])
    base.add_argument("--tokenizer", help="tokenizer.model (default: the Llama folder's)")
    base.add_argument("--dataset_statistics", help="dataset_statistics.json to store with the checkpoint")
    base.add_argument("--seed", type=int, default=0, help="projector init and new vocabulary rows")
    base.add_argument("--overwrite", action="store_true")

    exp = sub.add_parser("export", parents=[common], help="vla_jax checkpoint -> HF OpenVLA folder")
    exp.add_argument("ckpt", help="workdir, its checkpoints/ folder, or one step folder")
    exp.add_argument("out_dir", help="output folder (missing parent folders are created)")
    exp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    exp.add_argument("--tokenizer", help="tokenizer.model or a folder of tokenizer files (default: the embedded one)")
    exp.add_argument("--max_shard_size", default="5GB")
    exp.add_argument("--remote_code", help="folder with configuration/modeling/processing_prismatic.py to copy "
                                           "(needed for AutoModelForVision2Seq(..., trust_remote_code=True))")
    exp.add_argument("--overwrite", action="store_true")

    oft = sub.add_parser("import-oft", parents=[common],
                         help="released OpenVLA-OFT folder (merged model + action_head/proprio_projector files) -> "
                              "vla_jax checkpoint")
    oft.add_argument("oft_dir", help="folder with config.json, model*.safetensors, dataset_statistics.json, "
                                     "action_head--STEP_checkpoint.{pt,safetensors}, proprio_projector--STEP_...")
    oft.add_argument("out_dir", help="output workdir (OUT/checkpoints/0/...)")
    oft.add_argument("--chunk_size", type=int, required=True,
                     help="K, actions per chunk (not stored in the checkpoint; upstream: 8 LIBERO, 25 ALOHA, 5 Bridge)")
    oft.add_argument("--cameras", required=True,
                     help="camera names in input order, primary first, comma-separated (their number is upstream's "
                          "num_images_in_input, not stored in the checkpoint), e.g. full_image,wrist_image")
    oft.add_argument("--step", help="which STEP of action_head--STEP_checkpoint.* when the folder holds several")
    oft.add_argument("--allow_pickle", action="store_true",
                     help="read the .pt files (torch pickles) with a restricted unpickler that only rebuilds tensors")
    oft.add_argument("--param_dtype", default="checkpoint", choices=["checkpoint", "float32", "bfloat16"],
                     help="dtype of the stored params; 'checkpoint' keeps the merged model's (bf16 released)")
    oft.add_argument("--tokenizer", help="tokenizer.model to embed (default: the one in OFT_DIR)")
    oft.add_argument("--text_len", type=int, help="recorded text length, BOS..</s> (default K x D + 72)")
    oft.add_argument("--film_lora_alpha", type=float,
                     help="OFT+: LoRA alpha of vision_backbone--STEP's adapters (not stored there; default "
                          "min(rank, 16), upstream's loader)")
    oft.add_argument("--overwrite", action="store_true")

    eoft = sub.add_parser("export-oft", parents=[common], help="vla_jax OpenVLA-OFT checkpoint -> the OFT layout")
    eoft.add_argument("ckpt", help="workdir, its checkpoints/ folder, or one step folder")
    eoft.add_argument("out_dir", help="output folder (missing parent folders are created)")
    eoft.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="the merged model's safetensors")
    eoft.add_argument("--head_dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="action_head--STEP file (upstream saves bf16)")
    eoft.add_argument("--proprio_dtype", default="float32", choices=["bfloat16", "float32", "float16"],
                      help="proprio_projector--STEP file (upstream saves fp32)")
    eoft.add_argument("--step", help="STEP in the file names (default: the imported folder's, else the checkpoint's)")
    eoft.add_argument("--tokenizer", help="tokenizer.model or a folder of tokenizer files (default: the embedded one)")
    eoft.add_argument("--max_shard_size", default="5GB")
    eoft.add_argument("--remote_code", help="folder with configuration/modeling/processing_prismatic.py to copy")
    eoft.add_argument("--film_dtype", default="float32", choices=["bfloat16", "float32", "float16"],
                      help="OFT+: vision_backbone--STEP file (the FiLM-wrapped towers)")
    eoft.add_argument("--film_lora_rank", default="auto",
                      help="OFT+: rank of the zero LoRA adapters written beside the towers' weights (upstream's "
                           "loader needs its lora_rank); 'auto' = the imported file's, else 32; 0 = none")
    eoft.add_argument("--overwrite", action="store_true")
    return p


def _dtype(arg: str):
    return None if arg == "checkpoint" else arg


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from vla_jax import logs

    logs.setup(verbose=args.verbose)
    say = lambda s: print(s, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    try:
        from vla_jax.hf import import_checkpoint as ic

        if args.command in ("import", "import-base", "import-oft"):
            ic.use_host_devices()

        if args.command == "import":
            if os.path.isfile(args.hf_dir) and args.hf_dir.endswith(PICKLE_SUFFIXES):
                if not args.allow_pickle:
                    raise ValueError(f"{args.hf_dir} is a PyTorch pickle; pickles can run arbitrary code when loaded "
                                     f"and are refused by default. Convert it to safetensors, or pass --allow_pickle "
                                     f"(a restricted unpickler that only rebuilds tensors) with --hf_config=config.json")
                if not args.hf_config:
                    raise ValueError("--allow_pickle needs --hf_config=PATH/config.json (an HF OpenVLA config "
                                     "describing the model; the .pt holds weights only)")
                s = ic.import_pickle(args.hf_dir, args.out_dir, hf_config=args.hf_config,
                                     param_dtype=_dtype(args.param_dtype), tokenizer=args.tokenizer,
                                     overwrite=args.overwrite, log=say)
            else:
                s = ic.import_hf(args.hf_dir, args.out_dir, param_dtype=_dtype(args.param_dtype),
                                 tokenizer=args.tokenizer, overwrite=args.overwrite, log=say)
            say(f"model: {ic.describe(s['config'])}")
            say(f"norm_stats: {s['norm_stats'] or 'none'}; tokenizer: {s['tokenizer']}")
            say(f"wrote {s['out_dir']}/checkpoints/0 in {time.perf_counter() - t0:.1f} s "
                f"(use it as init_from / --checkpoint)")
        elif args.command == "import-base":
            stats = None
            if args.dataset_statistics:
                from vla_jax.hf.config import read_json
                stats = read_json(args.dataset_statistics)
            s = ic.import_base(args.dino, args.siglip, args.llm, args.out_dir, image_size=args.image_size,
                               param_dtype=_dtype(args.param_dtype), tokenizer=args.tokenizer, seed=args.seed,
                               norm_stats=stats, overwrite=args.overwrite, log=say)
            say(f"model: {ic.describe(s['config'])}")
            say(f"wrote {s['out_dir']}/checkpoints/0 in {time.perf_counter() - t0:.1f} s (projector freshly "
                f"initialised, seed {args.seed})")
        elif args.command == "import-oft":
            from vla_jax.hf import oft_io
            s = oft_io.import_oft(args.oft_dir, args.out_dir, chunk_size=args.chunk_size,
                                  cameras=[c.strip() for c in args.cameras.split(",")], step=args.step,
                                  allow_pickle=args.allow_pickle, param_dtype=_dtype(args.param_dtype),
                                  tokenizer=args.tokenizer, text_len=args.text_len, overwrite=args.overwrite,
                                  film_lora_alpha=args.film_lora_alpha, log=say)
            say(f"model: {ic.describe(s['config'])}")
            say(oft_io.describe_oft(s["config"], s))
            say(f"norm_stats: {s['norm_stats']} (dataset_statistics.json); tokenizer: {s['tokenizer']}")
            say(f"wrote {s['out_dir']}/checkpoints/0 in {time.perf_counter() - t0:.1f} s")
        elif args.command == "export-oft":
            from vla_jax.hf import oft_io
            step, files = oft_io.export_oft(args.ckpt, args.out_dir, dtype=args.dtype, head_dtype=args.head_dtype,
                                            proprio_dtype=args.proprio_dtype, step=args.step, tokenizer=args.tokenizer,
                                            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                            remote_code=args.remote_code, film_dtype=args.film_dtype,
                                            film_lora_rank=args.film_lora_rank)
            total = sum(os.path.getsize(os.path.join(args.out_dir, f)) for f in files)
            say(f"wrote {os.path.abspath(args.out_dir)} (OpenVLA-OFT step {step}): {len(files)} files, "
                f"{total / 1e9:.2f} GB ({', '.join(files)}) in {time.perf_counter() - t0:.1f} s")
            say("the extra modules are safetensors with the released keys; torch.save(safetensors.torch.load_file(F), "
                "F.replace('.safetensors', '.pt')) gives upstream's .pt")
        else:
            from vla_jax.hf.exporter import export_checkpoint
            files = export_checkpoint(args.ckpt, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer,
                                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                      remote_code=args.remote_code)
            total = sum(os.path.getsize(os.path.join(args.out_dir, f)) for f in files)
            say(f"wrote {os.path.abspath(args.out_dir)}: {len(files)} files, {total / 1e9:.2f} GB "
                f"({', '.join(files)}) in {time.perf_counter() - t0:.1f} s")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
