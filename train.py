"""Train OpenVLA: `python train.py --config=configs/<name>.py[:args] --workdir=DIR [--config.key=value ...]`.

Restarting the same command resumes from the latest checkpoint in DIR/checkpoints. SIGTERM saves a
checkpoint and exits cleanly. The machinery lives in vla_jax/training/ and vla_jax/checkpoints.py.
"""

import atexit
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder: checkpoints/, metrics.jsonl, tensorboard/.")
flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"], "Call jax.distributed.initialize().")
flags.DEFINE_string("coordinator", "", "host:port of process 0 (multi-process runs without auto-detection).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator).")
flags.DEFINE_bool("verbose", False, "Also show third-party INFO logs (absl/orbax/TF/jax); see vla_jax/logs.py.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cfg, workdir = FLAGS.config, FLAGS.workdir
    from vla_jax import logs

    logs.setup(verbose=FLAGS.verbose or FLAGS["verbosity"].present)  # before TF is imported
    import jax  # noqa: E402 (after flag parsing, so --help is fast)
    from vla_jax import checkpoints as ckpt_lib
    from vla_jax import sharding as shd
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.training import metrics as mlib
    from vla_jax.training import loop, run, state as st, step as sp, writers

    run.check_run_config(cfg)
    run.maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if cfg.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compile_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    is_main = jax.process_index() == 0

    # Model, mesh, batch layout, optimizer: all checked before anything is read or written.
    model_cfg = run.model_config(cfg.model)
    model = OpenVLA(model_cfg)
    mesh = run.make_mesh(cfg.mesh)
    per_process_batch = run.check_batch_layout(cfg, mesh)
    run.fit_warmup(cfg)
    tx, schedule = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    hooks = run.param_hooks(cfg)
    example = run.example_inputs(run.batch_spec(cfg, model_cfg))  # init shapes only
    mask = run.trainable(cfg, st.abstract_params(model, example, hooks), hooks)
    shardings, abstract = st.abstract_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask, hooks)

    new_dirs = [d for d in (os.path.join(workdir, "checkpoints"), workdir) if not os.path.exists(d)]
    atexit.register(lambda: [run.remove_if_empty(d) for d in new_dirs])  # a failed run leaves no empty folders
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.keep_checkpoints, cfg.async_checkpoints)
    try:
        start = ckpt.latest_step() or 0
    except ckpt_lib.CheckpointError as e:  # checkpoints exist but none verifies: one message, no traceback
        sys.exit(f"train.py: {e}")
    if start:
        ckpt.check_compatible(start, abstract, run.geometry(model_cfg))
    if start >= cfg.num_steps:
        logging.warning("checkpoint step %d >= num_steps %d: nothing to do", start, cfg.num_steps)
        return

    data = run.make_data(cfg, model_cfg, per_process_batch, mesh)
    spec = data.batch_spec  # the run's batch layout: checked on every batch, stored with every checkpoint
    loss_cfg = sp.LossConfig.for_model(model_cfg, spec)
    if start:
        state, data_json = ckpt.restore(start, abstract)
        data.iterator.set_state(ckpt_lib.decode_data_state(data_json, jax.process_index(), jax.process_count()))
        logging.warning("resumed from step %d", start)
    else:
        params = run.load_pretrained(cfg.init_from, abstract.params, model_cfg) if cfg.init_from else None
        state = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask, hooks,
                                      params=params)[0]
    assets = ckpt_lib.build_assets(cfg.to_dict(), data.statistics, data.tokenizer_asset, spec, data.training_data)
    summary = st.param_summary(abstract.params, mask)

    batch_shapes = spec.shapes(cfg.global_batch_size)
    step_fn = sp.make_train_step(model, tx, schedule, loss_cfg, mask, cfg.grad_accum_steps, hooks, mesh)
    train_step = sp.jit_train_step(step_fn, mesh, shardings, batch_shapes)
    train_steps = None
    if cfg.steps_per_call > 1:  # several steps per program; train_step then runs only off-schedule steps
        chunk_step = sp.jit_train_step(step_fn, mesh, shardings, batch_shapes, steps_per_call=cfg.steps_per_call)

        def run_chunk(state, batches):
            stacked = sp.stack_batches(batches, spec.keys)
            return chunk_step(state, shd.host_batch_to_global(stacked, mesh, stacked=True))
        train_steps = run_chunk
    flops = cfg.global_batch_size * mlib.train_flops_per_example(
        model_cfg, cfg.data.max_seq_len, loss_cfg.num_supervised, mlib.parts_trainable(mask))
    peak = mlib.device_peak_flops(jax.devices()[0].device_kind)
    writer = writers.MetricWriter(workdir, is_main, cfg.num_steps, start, cfg.log.tensorboard,
                                  {"project": cfg.log.wandb_project} if cfg.log.wandb_project else None,
                                  cfg.log.progress, cfg.to_dict())
    writer.message(f"params {summary['total']:,} (trainable {summary['trainable']:,}); mesh {dict(mesh.shape)}; "
                   f"global batch {cfg.global_batch_size}; steps {start}->{cfg.num_steps}")
    train_step = logs.compile_on_first_call(train_step, "the train step", writer.message)
    if train_steps is not None:
        chunk_step = logs.compile_on_first_call(chunk_step, f"the {cfg.steps_per_call}-step train program",
                                                writer.message)
    preemption = run.Preemption()

    def save(step, state, data_state):
        states = shd.allgather_host_arrays(data_state)
        ckpt.save(step, state, ckpt_lib.encode_data_states(states), assets, run.geometry(model_cfg), force=True)

    def record(step, metrics, seconds):
        return mlib.step_record(step, metrics, data.dataset_names, seconds, cfg.global_batch_size, flops,
                                jax.device_count(), peak)

    state, status = loop.train_loop(
        state, train_step, data.iterator, start=start, num_steps=cfg.num_steps, save_every=cfg.save_every,
        log_every=cfg.log_every, to_global=lambda b: shd.host_batch_to_global(spec.select(b), mesh),
        record=record, save=save, writer=writer, preempted=preemption.requested, latest_saved=ckpt.latest_step,
        check_batch=spec.check,
        steps_per_call=cfg.steps_per_call, train_steps=train_steps)
    ckpt.close()
    writer.close()
    preemption.restore()
    if status == loop.NONFINITE:
        sys.exit(1)


if __name__ == "__main__":
    from vla_jax.training.run import parse_flags  # noqa: E402

    app.run(main, flags_parser=parse_flags)
