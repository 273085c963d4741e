"""Capacity planning without the hardware: compile the real programs for a target and read the result.

    python -m vla_jax.plan --config=configs/oxe.py --topology=v5p-128     # TPU compiler (libtpu), no TPU
    python -m vla_jax.plan --config=configs/oft.py:cameras=1,proprio=0 --topology=v5e-4 --program=oft_predict --batch=1,8,32
    python -m vla_jax.plan --config=configs/oxe.py --devices=64           # N simulated CPU devices

XLA compiles the full train step (vision towers + projector + LLM, forward + backward + AdamW, with the
config's sharding rules, remat and dtypes) ahead of time; nothing is allocated. With `--topology` the
TPU compiler of the `libtpu` package compiles for the compile-only devices of that slice
(`jax.experimental.topologies`), so its memory figures are the TPU's buffer assignment; with
`--devices` the CPU backend's (temporaries then are a CPU estimate, +-1-2 GB against a GPU/TPU).

Reported per chip: parameter, optimizer-state and batch bytes (from the shardings), XLA's argument /
output / temporary sizes and the peak (arguments + outputs - donated + temporaries + code), the
chip's HBM and the margin; the compiled matmul FLOPs (loops counted by trip count, `hlo_cost`) next
to the analytic model FLOPs (`vla_jax.training.metrics`); a roofline step time from the vendor's chip
numbers (`chips`) and what it means for OpenVLA's pretraining (`roofline`).

Inference: `--program=predict_action` (autoregressive: prefill + 6 cached steps, one action per row)
and `--program=oft_predict` (OpenVLA-OFT's single pass: K actions per row, from an OFT config such as
configs/oft.py), bf16 weights tensor-parallel by default: per-chip bytes, a roofline latency and the
actions/s it allows. A program the TPU compiler refuses for lack of HBM is reported with the
compiler's own figures (needed bytes, excess), not raised.

Modules: chips (chip table, slice names), train_program (the step, built for any devices),
inference (the predict_action program), oft_inference (the OFT single pass), aot (compile, reading an
out-of-HBM refusal), hlo_cost (FLOPs/bytes from compiled HLO), planner (fit, batch search, mesh
checks), roofline, report (text), __main__ (flags).
"""
