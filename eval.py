"""Evaluate a policy: `python eval.py --checkpoint=RUN` (or `--checkpoint=CKPT --data_dir=D --dataset=NAME --out=DIR`).

Offline (default): the policy acts on every frame of held-out episodes of a registered dataset or
mixture; OUT gets report.json, report.md and plots/*.png (vla_jax/evaluation/). A vla_jax checkpoint
records what it trained on (data_dir, mixture, the dataset configs), so `--checkpoint=RUN` alone
evaluates on the held-out split of its training datasets and writes RUN/eval/.
Closed loop: `--sim=metaworld [--sim_episodes=N ...]`: Meta-World on held-out configurations
(vla_jax/sim/closed_loop.py); OUT gets report.json and GIF rollouts.
"""

import logging

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "vla_jax workdir / step folder, or an HF OpenVLA folder.")
flags.DEFINE_string("data_dir", None, "Folder holding the TFDS builder folders (default: the one the checkpoint "
                    "trained on).")
flags.DEFINE_string("dataset", None, "Registered dataset or mixture name (default: the checkpoint's training mixture).")
flags.DEFINE_string("split", "val", "Split to evaluate on ('val' falls back to the last 5% of train).")
flags.DEFINE_integer("episodes", 0, "Episodes per dataset (0: all).")
flags.DEFINE_string("out", None, "Output folder for the report and plots (default: RUN/eval).")
flags.DEFINE_enum("gripper", "openvla", ["openvla", "dataset"], "Gripper convention of the raw-unit metrics and "
                  "plots: 'openvla' (1 = open, 0 = closed) or 'dataset' (the convention the dataset was "
                  "registered with).")
flags.DEFINE_string("unnorm_key", None, "Statistics to un-normalize with (default: each dataset's own name).")
flags.DEFINE_integer("batch_size", 32, "Frames decoded together.")
flags.DEFINE_integer("plots", 3, "Episodes per dataset to plot.")
flags.DEFINE_enum("center_crop", "auto", ["auto", "true", "false"],
                  "Test-time crop (auto: as the checkpoint's batch_spec says; older checkpoints: their image_aug; "
                  "HF: none).")
flags.DEFINE_bool("action_tokens_only", False, "Restrict the argmax to the 256 action tokens.")
flags.DEFINE_string("dataset_configs", None, "Extra dataset/mixture registrations (.json/.py).")
flags.DEFINE_string("compilation_cache", None, "Persistent XLA cache folder, 'default' or 'off'.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("verbose", False, "Also show third-party INFO logs (absl/orbax/TF/jax); see vla_jax/logs.py.")
flags.DEFINE_string("sim", "", "Closed-loop simulator evaluation instead of offline ('metaworld').")
# Closed-loop (--sim=metaworld) settings: vla_jax/sim/closed_loop.py.
flags.DEFINE_list("sim_tasks", ["reach", "drawer-close", "button-press-topdown", "window-open", "drawer-open", "push"],
                  "Meta-World tasks (held-out configurations, MT1 seed 1).")
flags.DEFINE_integer("sim_episodes", 10, "Episodes per task.")
flags.DEFINE_integer("sim_image_size", 64, "Rendered image side: the demo dataset's stored size.")
flags.DEFINE_integer("sim_max_steps", 200, "Episode step limit.")
flags.DEFINE_integer("sim_workers", 2, "Simulator worker processes.")
flags.DEFINE_integer("sim_execute", 0, "Chunked (OpenVLA-OFT) checkpoints: actions of each predicted chunk run "
                     "open-loop before re-planning (0: all K, as OFT does; upstream's LIBERO script would run the "
                     "last n of a chunk when n < K, we run the first n).")
flags.DEFINE_integer("sim_videos", 2, "GIF rollouts per task and policy.")
flags.DEFINE_string("sim_reference_cache", "", "Folder that keeps the expert/random reference lines between "
                    "evaluations with the same settings (they do not depend on the checkpoint); '' = always run them.")
flags.mark_flags_as_required(["checkpoint"])
FLAGS = flags.FLAGS


def run_sim(policy):
    """--sim=metaworld: the policy acts in Meta-World on held-out configurations beside the scripted
    expert and a random policy; OUT gets report.json and GIFs (vla_jax.sim.closed_loop)."""
    import json

    if FLAGS.sim != "metaworld":
        raise app.UsageError(f"--sim={FLAGS.sim!r}: the only simulator is 'metaworld'")
    from vla_jax.policy.loading import is_hf_dir
    from vla_jax.sim.checkpoint_policy import SimPolicy
    from vla_jax.sim.closed_loop import run_evaluation

    data_dir = FLAGS.data_dir
    if not data_dir and not is_hf_dir(FLAGS.checkpoint):  # the demo dataset it trained on: its second camera
        from vla_jax import checkpoints

        data_dir = (checkpoints.load_assets(FLAGS.checkpoint).get("training_data") or {}).get("data_dir")
    # The checkpoint's spec decides what the policy sees: a second camera and/or the proprio state.
    sim_policy = SimPolicy(policy, FLAGS.unnorm_key, data_dir=data_dir)
    rep = run_evaluation(sim_policy, FLAGS.sim_tasks, FLAGS.sim_episodes, FLAGS.out, name="model",
                         image_size=FLAGS.sim_image_size, max_steps=FLAGS.sim_max_steps, workers=FLAGS.sim_workers,
                         videos_per_task=FLAGS.sim_videos, reference_cache=FLAGS.sim_reference_cache or None,
                         execute=FLAGS.sim_execute or None, wrist_camera=sim_policy.wrist_camera)
    print(json.dumps({n: round(r["mean_success_rate"], 4) for n, r in rep["results"].items()}
                     | {"report": f"{FLAGS.out}/report.json"}))


def main(argv):
    del argv
    import json

    from vla_jax import logs

    logs.setup(verbose=FLAGS.verbose or FLAGS["verbosity"].present)  # before TF is imported
    from vla_jax.evaluation import run_offline
    from vla_jax.policy import Policy

    cache = {None: None, "default": True, "off": False}.get(FLAGS.compilation_cache, FLAGS.compilation_cache)

    def load_policy():
        crop = {"auto": None, "true": True, "false": False}[FLAGS.center_crop]
        return Policy.load(FLAGS.checkpoint, center_crop=crop,
                           action_tokens_only=FLAGS.action_tokens_only, compilation_cache=cache)
    if FLAGS.sim:
        if not FLAGS.out:
            raise app.UsageError("--sim needs --out=FOLDER")
        return run_sim(load_policy())
    from vla_jax.evaluation.inputs import resolve_eval_data
    from vla_jax.policy.loading import is_hf_dir

    try:  # before loading the model: a missing flag is reported at once
        where = resolve_eval_data(FLAGS.checkpoint, data_dir=FLAGS.data_dir, dataset=FLAGS.dataset, out=FLAGS.out,
                                  dataset_configs=FLAGS.dataset_configs, is_hf=is_hf_dir(FLAGS.checkpoint))
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    policy = load_policy()
    logging.getLogger("vla_jax.eval").info("evaluating on %s (split %s) in %s; report in %s", where.dataset, FLAGS.split, where.data_dir,
                 where.out)
    rep = run_offline(policy, checkpoint=FLAGS.checkpoint, data_dir=where.data_dir, dataset=where.dataset,
                      out_dir=where.out, split=FLAGS.split, episodes=FLAGS.episodes or None,
                      unnorm_key=FLAGS.unnorm_key, batch_size=FLAGS.batch_size, num_plots=FLAGS.plots,
                      dataset_configs=FLAGS.dataset_configs, progress=FLAGS.progress, gripper=FLAGS.gripper)
    m = rep["overall"] or next(iter(rep["per_dataset"].values()))
    tok = m["action_token_accuracy"]
    print(json.dumps({"frames": m["frames"], "action_token_accuracy": None if tok is None else round(tok, 4),
                      "l1_normalized": round(m["l1_normalized"], 4),
                      "baseline_l1_normalized": round(m["baseline_mean_action"]["l1_normalized"], 4),
                      "gripper_accuracy": m["gripper_accuracy"], "report": f"{where.out}/report.md"}
                     | ({"l1_normalized_per_step": [round(x, 4) for x in m["l1_normalized_per_step"]]}
                        if m.get("chunk_size") else {})))


if __name__ == "__main__":
    app.run(main)
