"""Evaluate a policy: `python eval.py --checkpoint=CKPT --data_dir=D --dataset=NAME --out=DIR`.

Offline (default): the policy acts on every frame of held-out episodes of a registered dataset or
mixture; OUT gets report.json, report.md and plots/*.png (vla_jax/evaluation/).
Closed loop: `--sim=metaworld [--sim_episodes=N ...]`: Meta-World on held-out configurations
(vla_jax/sim/closed_loop.py); OUT gets report.json and GIF rollouts.
"""

from absl import app, flags

flags.DEFINE_string("checkpoint", None, "vla_jax workdir / step folder, or an HF OpenVLA folder.")
flags.DEFINE_string("data_dir", None, "Folder holding the TFDS builder folders (offline evaluation).")
flags.DEFINE_string("dataset", None, "Registered dataset or mixture name.")
flags.DEFINE_string("split", "val", "Split to evaluate on ('val' falls back to the last 5% of train).")
flags.DEFINE_integer("episodes", 0, "Episodes per dataset (0: all).")
flags.DEFINE_string("out", None, "Output folder for the report and plots.")
flags.DEFINE_string("unnorm_key", None, "Statistics to un-normalize with (default: each dataset's own name).")
flags.DEFINE_integer("batch_size", 32, "Frames decoded together.")
flags.DEFINE_integer("plots", 3, "Episodes per dataset to plot.")
flags.DEFINE_enum("center_crop", "auto", ["auto", "true", "false"], "Test-time crop (auto: as the checkpoint records).")
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
flags.DEFINE_integer("sim_videos", 2, "GIF rollouts per task and policy.")
flags.DEFINE_string("sim_reference_cache", "", "Folder that keeps the expert/random reference lines between "
                    "evaluations with the same settings (they do not depend on the checkpoint); '' = always run them.")
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS


def run_sim(policy):
    """--sim=metaworld: the policy acts in Meta-World on held-out configurations beside the scripted
    expert and a random policy; OUT gets report.json and GIFs (vla_jax.sim.closed_loop)."""
    import json

    if FLAGS.sim != "metaworld":
        raise app.UsageError(f"--sim={FLAGS.sim!r}: the only simulator is 'metaworld'")
    from vla_jax.sim.closed_loop import run_evaluation

    rep = run_evaluation(lambda images, instructions: policy.predict_actions(images, instructions, FLAGS.unnorm_key),
                         FLAGS.sim_tasks, FLAGS.sim_episodes, FLAGS.out, name="model",
                         image_size=FLAGS.sim_image_size, max_steps=FLAGS.sim_max_steps, workers=FLAGS.sim_workers,
                         videos_per_task=FLAGS.sim_videos, reference_cache=FLAGS.sim_reference_cache or None)
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
    policy = Policy.load(FLAGS.checkpoint, center_crop={"auto": None, "true": True, "false": False}[FLAGS.center_crop],
                         action_tokens_only=FLAGS.action_tokens_only, compilation_cache=cache)
    if FLAGS.sim:
        return run_sim(policy)
    if not FLAGS.data_dir or not FLAGS.dataset:
        raise app.UsageError("offline evaluation needs --data_dir and --dataset")
    rep = run_offline(policy, checkpoint=FLAGS.checkpoint, data_dir=FLAGS.data_dir, dataset=FLAGS.dataset,
                      out_dir=FLAGS.out, split=FLAGS.split, episodes=FLAGS.episodes or None,
                      unnorm_key=FLAGS.unnorm_key, batch_size=FLAGS.batch_size, num_plots=FLAGS.plots,
                      dataset_configs=FLAGS.dataset_configs, progress=FLAGS.progress)
    m = rep["overall"] or next(iter(rep["per_dataset"].values()))
    print(json.dumps({"frames": m["frames"], "action_token_accuracy": round(m["action_token_accuracy"], 4),
                      "l1_normalized": round(m["l1_normalized"], 4),
                      "baseline_l1_normalized": round(m["baseline_mean_action"]["l1_normalized"], 4),
                      "gripper_accuracy": m["gripper_accuracy"], "report": f"{FLAGS.out}/report.md"}))


if __name__ == "__main__":
    app.run(main)
