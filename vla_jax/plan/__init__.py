"""Capacity planning without the hardware: compile the real programs for a target and read the result.

    python -m vla_jax.plan --config=configs/oxe.py --topology=v5p-128     # TPU compiler (libtpu), no TPU
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

Modules: chips (chip table, slice names), train_program (the step, built for any devices),
inference (the predict_action program), hlo_cost (FLOPs/bytes from compiled HLO), planner (fit,
batch search, mesh checks), roofline, report (text), __main__ (flags).
"""
