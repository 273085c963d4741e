"""`make demo`: closed-loop robot control in Meta-World with a tiny OpenVLA trained on this CPU.

    python -m vla_jax.demo [--out=DIR] [--minutes=16] [--episodes=10] [--recipe=NAME] [--cameras=2] [--proprio]

Phases (each a subprocess except the tokenizer, so TensorFlow and the simulator never share one):
  1. data       Meta-World expert demonstrations -> RLDS (vla_jax.sim.demos; cached)
  2. tokenizer  a 512-piece SentencePiece model of the instructions, last 256 ids = action bins (cached)
  3. train      train.py --config=configs/demo.py, steps sized to --minutes at the speed measured on
                this machine (a short calibration run first)
  4. offline    eval.py on the held-out 'val' split (token accuracy, L1)
  5. closed     eval.py --sim=metaworld on held-out configurations (success per task, GIFs)
  6. export     python -m vla_jax.hf export (an HF-format folder)
and prints a summary with the file locations. Re-running with the same --out resumes: the data
and tokenizer are cached and a finished training run is kept. The result (recipe, success per task,
steps, wall time, machine, commit) is also written to bench/results/demo_<recipe>.json.

Several cameras and proprio: `--cameras=2` adds the demo data's wrist camera (gripperPOV) and `--proprio`
the 4-D proprio state (hand xyz, gripper opening): the data variant make_demo_data writes with
`--wrist_camera=gripperPOV [--proprio]` (its default folder; generated if missing), configs/demo.py
`cameras=2,proprio=1`, its own train folder (train[_<recipe>]_cams2_proprio) and evaluation folders, and
the result file demo_<recipe>_cams2_proprio.json (its `cameras` and `proprio_dim` read from the trained
checkpoint's spec). Evaluation gives the policy what its spec asks for (eval.py, vla_jax.sim.checkpoint_policy);
OpenVLA's HF layout has one image and no proprio, so such a model skips the HF export.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGE = 64
DEMO_VOCAB = 512
N_ACTION_BINS = 256
TEXT_PIECES = 256  # upper bound for the learned text pieces; the rest up to DEMO_VOCAB is filler


def default_out_dir() -> str:
    root = os.environ.get("VLA_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vla_jax"))
    return os.path.join(root, "demo_run")


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer_sentences():
    """(training sentences, user-defined pieces) of the demo tokenizer."""
    from vla_jax.sim.instructions import INSTRUCTIONS
    from vla_jax.tokenizer import build_prompt

    # Training sentences are lines, so the prompt's newline is a user-defined piece instead.
    sentences = sorted(build_prompt(i).replace("\n", " ") for i in INSTRUCTIONS.values())
    # User-defined pieces match the normalized text, where spaces are SentencePiece's "\u2581".
    head, tail = build_prompt("{}").split("{}")
    return sentences, ["\n", (" " + head.rstrip()).replace(" ", "\u2581"), tail]


def tokenizer_path(out: str, vocab_size: int = DEMO_VOCAB) -> str:
    """out/tokenizer/<fingerprint>/tokenizer.model: a changed recipe never reuses a stale model."""
    sentences, symbols = _tokenizer_sentences()
    key = json.dumps([sentences, symbols, vocab_size, TEXT_PIECES, N_ACTION_BINS]).encode()
    return os.path.join(out, "tokenizer", hashlib.sha256(key).hexdigest()[:12], "tokenizer.model")


def build_tokenizer(path: str, vocab_size: int = DEMO_VOCAB) -> str:
    """Trains a SentencePiece BPE model on the prompts of every Meta-World instruction and pads it
    with UNUSED pieces to exactly `vocab_size` pieces, so the last 256 ids (the action bins, as in
    OpenVLA) never come out of text encoding. Writes `path` (kept if present); returns it.
    Ids: unk 0, BOS 1, EOS 2. The prompt template's fixed parts ('In: What action should the robot
    take to' and '?\\nOut:') are user-defined pieces: the demo tasks' prompts are then 5-9 pieces
    (16 at most over all 50 tasks) instead of 21-30, which shortens the sequence the Llama trains on
    (the template carries no information)."""
    if os.path.isfile(path):
        return path
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    if vocab_size < TEXT_PIECES + N_ACTION_BINS:
        raise ValueError(f"vocab_size={vocab_size} must be >= {TEXT_PIECES + N_ACTION_BINS} "
                         f"({TEXT_PIECES} text pieces + {N_ACTION_BINS} action ids)")
    sentences, symbols = _tokenizer_sentences()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4), model_writer=buf, vocab_size=TEXT_PIECES, model_type="bpe",
        hard_vocab_limit=False, normalization_rule_name="identity", user_defined_symbols=symbols,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    for i in range(vocab_size - len(proto.pieces)):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"<unused_{i:03d}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Phases


def _run(cmd: List[str], log_path: str, tee: bool = True, stop_after_s: Optional[float] = None) -> bool:
    """Runs `cmd` from the repository root; output goes to the terminal (if tee) and `log_path`.

    stop_after_s: send SIGTERM then (train.py saves a checkpoint and exits cleanly). Returns whether
    that stop was sent. A process ended by that SIGTERM is not a failure: the signal can land after
    train.py's last checkpoint, once its handler is gone; the caller reads the latest checkpoint."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    stopped = threading.Event()

    def stop(proc):
        stopped.set()
        proc.send_signal(signal.SIGTERM)

    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timer = threading.Timer(stop_after_s, stop, (proc,)) if stop_after_s else None
        if timer:
            timer.daemon = True
            timer.start()
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            log.write(chunk)
            if tee:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        rc = proc.wait()
        if timer:
            timer.cancel()
    if rc and not (stopped.is_set() and rc == -signal.SIGTERM):
        raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} failed (exit {rc}); see {log_path}")
    return stopped.is_set()


def config_recipe(recipe: str) -> str:
    """--recipe -> configs/demo.py's recipe: 'oft' for 'oft' or 'oft_<label>' (OpenVLA-OFT), else 'openvla'
    (other names only label the result file)."""
    return "oft" if recipe == "oft" or recipe.startswith("oft_") else "openvla"


def input_suffix(cameras: int = 1, proprio: bool = False) -> str:
    """'' for the one-camera demo, else e.g. '_cams2_proprio': names the train folder and the result file, so
    a variant with a wrist camera and/or proprio never resumes or overwrites the one-camera run."""
    return (f"_cams{cameras}" if cameras > 1 else "") + ("_proprio" if proprio else "")


def train_folder(out: str, recipe: str, cameras: int = 1, proprio: bool = False) -> str:
    """out/train (the OpenVLA recipe, one camera), out/train_<recipe> (OFT recipes), plus `input_suffix`."""
    base = "train" if config_recipe(recipe) == "openvla" else f"train_{recipe}"
    return os.path.join(out, base + input_suffix(cameras, proprio))


def train_command(workdir: str, data_dir: str, tokenizer: str, steps: int, batch: int = 0, recipe: str = "openvla",
                  chunk: int = 8, head: str = "l1", cameras: int = 1, proprio: bool = False) -> List[str]:
    arg = f"steps={steps}" + (f",batch={batch}" if batch else "")
    if config_recipe(recipe) == "oft":
        arg += f",recipe=oft,chunk={chunk},head={head}"
    if cameras > 1:  # configs/demo.py: the wrist camera of the demo data (model num_images, data.cameras)
        arg += f",cameras={cameras}"
    if proprio:  # ... and its proprio state (model proprio_dim, data.use_proprio)
        arg += ",proprio=1"
    return [sys.executable, "train.py", f"--config=configs/demo.py:{arg}",
            f"--workdir={workdir}",
            f"--config.tokenizer={tokenizer}", f"--config.data.data_dir={data_dir}",
            f"--config.data.dataset_configs={os.path.join(data_dir, 'dataset_config.json')}"]


def offline_command(ckpt: str, data_dir: str, out: str) -> List[str]:
    return [sys.executable, "eval.py", f"--checkpoint={ckpt}", f"--data_dir={data_dir}", "--dataset=metaworld_demo",
            "--split=val", f"--dataset_configs={os.path.join(data_dir, 'dataset_config.json')}", f"--out={out}",
            "--progress=false"]


def closed_loop_command(ckpt: str, out: str, episodes: int, workers: int, reference_cache: str = "") -> List[str]:
    return [sys.executable, "eval.py", f"--checkpoint={ckpt}", "--sim=metaworld", f"--out={out}",
            f"--sim_episodes={episodes}", f"--sim_image_size={DEMO_IMAGE}", f"--sim_workers={workers}",
            f"--sim_reference_cache={reference_cache}", "--progress=false"]


def export_command(ckpt: str, out: str, oft: bool = False) -> List[str]:
    """OpenVLA: the HF layout (`export`); OpenVLA-OFT: upstream's OFT layout (`export-oft`: the merged model
    plus the action-head and proprio-projector files). float32: the demo model is tiny and stays
    bit-exact; --overwrite: re-running the demo refreshes it."""
    if oft:
        return [sys.executable, "-m", "vla_jax.hf", "export-oft", ckpt, out, "--dtype=float32",
                "--head_dtype=float32", "--proprio_dtype=float32", "--overwrite"]
    return [sys.executable, "-m", "vla_jax.hf", "export", ckpt, out, "--dtype=float32", "--overwrite"]


def latest_step(workdir: str) -> Optional[int]:
    """The checkpoint step the evaluation phases will read (the newest under workdir), or None."""
    from vla_jax.checkpoints import resolve_step_dir

    try:
        return int(resolve_step_dir(workdir).name)
    except ValueError:
        return None


CALIBRATION_STEPS = 40  # metrics.jsonl records steps 1, 10, 20, 30, 40: the median of the last four


def measured_steps_per_s(metrics_path: str) -> float:
    """Training speed from a run's metrics.jsonl: 1 / the median step time of the records after step 1
    (step 1 includes compilation and the shuffle buffer's fill)."""
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    times = sorted(r["step_time"] for r in recs if r.get("step", 0) > 1 and r.get("step_time", 0) > 0)
    if not times:
        raise RuntimeError(f"{metrics_path} has no step times after step 1; cannot measure the training speed")
    return 1.0 / times[len(times) // 2]


def calibrate(out: str, data_dir: str, tokenizer: str, batch: int, log_path: str, **recipe) -> tuple:
    """Runs CALIBRATION_STEPS training steps in a scratch folder -> (steps/s, wall seconds). Its wall time
    (start-up and compilation included) comes out of the training budget."""
    scratch = os.path.join(out, "calibrate")
    shutil.rmtree(scratch, ignore_errors=True)
    t0 = time.perf_counter()
    _run(train_command(scratch, data_dir, tokenizer, CALIBRATION_STEPS, batch, **recipe), log_path, tee=False)
    rate = measured_steps_per_s(os.path.join(scratch, "metrics.jsonl"))
    shutil.rmtree(scratch, ignore_errors=True)
    return rate, time.perf_counter() - t0


def steps_for(minutes: float, steps_per_s: float) -> int:
    """Training steps that fit `minutes` at `steps_per_s` (after ~1 minute of compilation and start-up)."""
    if minutes <= 0:
        raise ValueError(f"--minutes={minutes} must be positive")
    return max(20, int(max(minutes - 1.0, minutes * 0.5) * 60 * steps_per_s) // 10 * 10)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m vla_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help=f"output folder (default {default_out_dir()})")
    p.add_argument("--data", default=None, help="demo dataset folder (default: the make_demo_data cache, 64 px, with "
                   "the wrist camera and/or proprio when asked for)")
    # Defaults sized for ~20 minutes in all on 2 cores: <= 16 min of training (calibration included),
    # then ~3.5 min of evaluation and export.
    p.add_argument("--minutes", type=float, default=16.0, help="training time budget (sets the step count)")
    p.add_argument("--steps", type=int, default=0, help="training steps (overrides --minutes)")
    p.add_argument("--steps_per_s", type=float, default=0.0,
                   help="training speed for --minutes; 0 (default) = measure it with a short calibration run")
    p.add_argument("--recipe", default="openvla",
                   help="name of the recipe in bench/results/demo_<recipe>.json; 'oft' or 'oft_<label>' trains "
                        "OpenVLA-OFT (configs/demo.py recipe=oft: parallel decoding of --chunk actions, --head)")
    p.add_argument("--chunk", type=int, default=8, help="OFT recipes: actions per chunk K")
    p.add_argument("--head", default="l1", choices=("l1", "tokens"), help="OFT recipes: the action head")
    p.add_argument("--cameras", type=int, default=1, choices=(1, 2),
                   help="2: add the demo data's wrist camera (gripperPOV) as a second camera (configs/demo.py cameras=2)")
    p.add_argument("--proprio", action="store_true",
                   help="feed the proprio state (hand xyz, gripper opening) as one token (configs/demo.py proprio=1)")
    p.add_argument("--batch", type=int, default=0, help="global batch size (default: configs/demo.py's)")
    p.add_argument("--episodes", type=int, default=10, help="closed-loop episodes per task (held-out configs)")
    p.add_argument("--workers", type=int, default=2, help="simulator worker processes")
    p.add_argument("--skip_export", action="store_true", help="skip the HF export")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from vla_jax.sim.demos import DemoSpec, generate, is_complete
    from vla_jax.sim.make_demo_data import default_data_dir
    from vla_jax.sim.observation import WRIST_CAMERA

    out = os.path.abspath(args.out or default_out_dir())
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "demo.log")
    times: Dict[str, float] = {}
    t_start = time.perf_counter()
    say = lambda m: print(f"[demo] {m}", flush=True)  # noqa: E731

    t = time.perf_counter()
    spec = DemoSpec(image_size=DEMO_IMAGE, wrist_camera=WRIST_CAMERA if args.cameras == 2 else "", proprio=args.proprio)
    data_dir = os.path.abspath(args.data or default_data_dir(spec))
    say(f"1/6 data: {data_dir}" + (" (cached)" if is_complete(data_dir, spec) else " (generating, ~5 min)"))
    generate(data_dir, spec, workers=args.workers, say=say)
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    tok = build_tokenizer(tokenizer_path(out))
    times["tokenizer"] = time.perf_counter() - t
    say(f"2/6 tokenizer: {tok}")

    t = time.perf_counter()
    # configs/demo.py's model recipe and inputs
    recipe = dict(recipe=args.recipe, chunk=args.chunk, head=args.head, cameras=args.cameras, proprio=args.proprio)
    # Each recipe and input variant trains in its own folder: a kept run is never resumed with another model.
    workdir = train_folder(out, args.recipe, args.cameras, args.proprio)
    label = args.recipe + input_suffix(args.cameras, args.proprio)  # bench/results/demo_<label>.json
    budget_s = args.minutes * 60
    steps = args.steps
    if not steps and latest_step(workdir) is None:
        rate = args.steps_per_s
        if rate <= 0:
            say(f"3/6 train: measuring this machine's speed ({CALIBRATION_STEPS} steps)")
            rate, cal_s = calibrate(out, data_dir, tok, args.batch, log_path, **recipe)
            budget_s -= cal_s
            say(f"3/6 train: {rate:.2f} steps/s measured in {cal_s:.0f} s")
        steps = steps_for(budget_s / 60, rate)
    elif not steps:  # resuming: the finished or interrupted run's own step count
        steps = _recorded_steps(workdir)
    # The time limit holds whatever happens to the machine's load meanwhile (the run then stops early
    # at a checkpoint, before its cosine schedule ends, and says so).
    say(f"3/6 train: {steps} steps (batch {args.batch or 'from configs/demo.py'}), at most {budget_s / 60:.1f} min "
        f"-> {workdir}")
    stopped = _run(train_command(workdir, data_dir, tok, steps, args.batch, **recipe), log_path,
                   stop_after_s=budget_s)
    times["train"] = time.perf_counter() - t
    trained = latest_step(workdir)
    if trained is None:
        raise RuntimeError(f"training wrote no checkpoint under {workdir}; see {log_path}")
    if stopped:
        say(f"training reached the {budget_s / 60:.1f}-min limit; evaluating step {trained} of {steps}")

    t = time.perf_counter()
    tag = input_suffix(args.cameras, args.proprio)  # '' for one camera: the paths as before
    offline_dir = os.path.join(out, f"eval_offline{tag}")
    say(f"4/6 offline evaluation on the held-out 'val' split -> {offline_dir}")
    _run(offline_command(workdir, data_dir, offline_dir), log_path)
    times["offline_eval"] = time.perf_counter() - t

    t = time.perf_counter()
    closed_dir = os.path.join(out, f"eval_closed_loop{tag}")
    say(f"5/6 closed-loop evaluation: {args.episodes} held-out episodes per task -> {closed_dir}")
    # The expert and random reference lines are kept next to the demo data: they are the same every run.
    refs = os.path.join(os.path.dirname(data_dir), "reference_lines")
    _run(closed_loop_command(workdir, closed_dir, args.episodes, args.workers, refs), log_path)
    times["closed_loop_eval"] = time.perf_counter() - t

    hf_dir = os.path.join(out, f"hf_export{tag}")
    # OpenVLA's HF layout has one image and no proprio projector: an autoregressive model with either is not
    # exported; an OFT model goes to upstream's OFT layout, which carries both.
    oft = config_recipe(args.recipe) == "oft"
    export = not args.skip_export and (oft or (args.cameras == 1 and not args.proprio))
    if not export and not args.skip_export:
        say("6/6 HF export skipped: OpenVLA's HF layout takes one camera and no proprio")
    if export:
        t = time.perf_counter()
        say(f"6/6 {'OFT-layout' if oft else 'HF'} export -> {hf_dir}")
        _run(export_command(workdir, hf_dir, oft), log_path)
        times["export"] = time.perf_counter() - t
    summary = summarize(out, offline_dir, closed_dir, hf_dir if export else None, times, workdir)
    with open(os.path.join(out, f"summary{tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    result_path = write_result(label, summary, trained, time.perf_counter() - t_start, workdir)
    print(format_summary(summary) + f"\nresult: {result_path}", flush=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Summary


def _recorded_steps(workdir: str) -> int:
    """num_steps of an existing demo training run (its checkpoint's config asset)."""
    from vla_jax.checkpoints import load_assets

    return int(load_assets(workdir)["config"]["num_steps"])


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def checkpoint_inputs(workdir: Optional[str]) -> tuple:
    """(camera count, proprio_dim or None) of the checkpoint under `workdir`, from its batch_spec asset (the
    contract it was trained with); (1, None) without a workdir or for a checkpoint without the asset."""
    if not workdir:
        return 1, None
    from vla_jax.checkpoints import load_assets

    spec = load_assets(workdir).get("batch_spec") or {}
    return len(spec.get("cameras") or ["primary"]), spec.get("proprio_dim")


def write_result(recipe: str, summary: Dict, train_steps: Optional[int], wall_s: float,
                 workdir: Optional[str] = None) -> str:
    """bench/results/demo_<recipe>.json: the run's held-out closed-loop result in a fixed schema; `cameras`
    and `proprio_dim` are the trained checkpoint's (`checkpoint_inputs(workdir)`)."""
    c = summary["closed_loop"]
    name = "model" if "model" in c["per_task"] else next(iter(c["per_task"]))
    cameras, proprio_dim = checkpoint_inputs(workdir)
    result = {"recipe": recipe, "cameras": cameras, "proprio_dim": proprio_dim,
              "mean_success": float(c["mean_success"][name]),
              "per_task": {t: float(v) for t, v in c["per_task"][name].items()},
              "train_steps": train_steps, "wall_s_total": round(wall_s, 1), "times_s": summary["times_s"],
              "offline": {k: summary["offline"][k] for k in ("action_token_accuracy", "l1_normalized")},
              "machine": machine_description(), "commit": git_commit()}
    path = os.path.join(REPO, "bench", "results", f"demo_{recipe}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def _first_success_gif(closed_dir: str, name: str = "model") -> Optional[str]:
    folder = os.path.join(closed_dir, "videos", name)
    if not os.path.isdir(folder):
        return None
    hits = sorted(f for f in os.listdir(folder) if f.endswith("_success.gif"))
    return os.path.join(folder, hits[0]) if hits else None


def summarize(out: str, offline_dir: str, closed_dir: str, hf_dir: Optional[str], times: Dict[str, float],
              workdir: Optional[str] = None) -> Dict:
    with open(os.path.join(offline_dir, "report.json")) as f:
        off = json.load(f)
    m = off.get("overall") or next(iter(off["per_dataset"].values()))
    with open(os.path.join(closed_dir, "report.json")) as f:
        closed = json.load(f)
    res = closed["results"]
    per_task = {name: {t: r["success_rate"] for t, r in rep["tasks"].items()} for name, rep in res.items()}
    return {
        "out": out, "times_s": {k: round(v, 1) for k, v in times.items()},
        "offline": {"frames": m["frames"], "action_token_accuracy": m["action_token_accuracy"],
                    "l1_normalized": m["l1_normalized"],
                    "baseline_l1_normalized": m["baseline_mean_action"]["l1_normalized"],
                    "report": os.path.join(offline_dir, "report.md")},
        "closed_loop": {"mean_success": {n: rep["mean_success_rate"] for n, rep in res.items()},
                        "per_task": per_task, "table": closed["table"],
                        "report": os.path.join(closed_dir, "report.json"),
                        "success_gif": _first_success_gif(closed_dir)},
        "checkpoint": os.path.join(workdir or os.path.join(out, "train"), "checkpoints"), "hf_export": hf_dir,
    }


def _fmt(x) -> str:
    """A metric for the summary; None (e.g. token accuracy of an L1-head model) prints as n/a."""
    return "n/a" if x is None else f"{x:.3f}"


def format_summary(s: Dict) -> str:
    o, c = s["offline"], s["closed_loop"]
    lines = ["", "=" * 72, "vla_jax demo: summary", "=" * 72,
             "time per phase (s): " + ", ".join(f"{k} {v}" for k, v in s["times_s"].items()),
             f"offline (held-out val, {o['frames']} frames): action-token accuracy {_fmt(o['action_token_accuracy'])}, "
             f"L1 (normalized) {o['l1_normalized']:.3f} vs mean-action baseline {o['baseline_l1_normalized']:.3f}",
             "closed-loop success rate (mean episode length) on held-out configurations:", c["table"],
             f"files: checkpoint {s['checkpoint']}", f"       offline report {o['report']}",
             f"       closed-loop report {c['report']}", f"       a success GIF {c['success_gif']}",
             f"       HF export {s['hf_export']}", "=" * 72]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
