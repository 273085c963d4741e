"""Simulation: Meta-World demo-data generation and closed-loop evaluation.

  instructions.py   one instruction per Meta-World task; task-name validation
  rendering.py      MuJoCo offscreen rendering (MUJOCO_GL, fast settings, clear errors)
  metaworld_env.py  the environment wrapper (camera images, 7-D OpenVLA actions, scripted experts)
  worker.py         simulator worker processes (rendering never shares a process with TensorFlow)
  rlds_writer.py    a generic writer of RLDS/TFDS builder folders
  demos.py          expert rollouts -> RLDS dataset + its dataset_config.json
  observation.py    what a policy sees of a step: camera images and the 4-D proprio state, by RLDS key
  closed_loop.py    success rate / episode length of any batched policy, reference lines, report
  checkpoint_policy.py  a vla_jax Policy in the closed loop: second camera and proprio from its spec
  video.py          rollout GIFs (PIL)
  make_demo_data.py the `python -m vla_jax.sim.make_demo_data` command

Nothing is imported here: the modules that import MuJoCo or TensorFlow are loaded only when used.
"""
