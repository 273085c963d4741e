"""The PyTorch side of `bench/compare_torch.py`: what a user of OpenVLA's PyTorch stack runs.

    python bench/torch_side.py prepare --setup=mid --dir=RUN   # weights, batch, reference values
    python bench/torch_side.py time --setup=mid --dir=RUN --train-reps=20 --infer-reps=20

The model is `tests/torch_reference.TorchOpenVLA` (timm towers + fused projector + transformers
`LlamaForCausalLM`, released HF key names), fp32, with transformers' default SDPA attention.

Training step, as OpenVLA's `PrismaticVLM.forward` + its training loop: the towers, projector and
Llama run over the whole multimodal sequence with the attention mask, logits at every position,
HF's shifted cross-entropy with labels -100 on the patches and every non-action token, backward,
global-norm clipping, `torch.optim.AdamW` (the same hyperparameters as the JAX side; `fused=True`,
torch's fastest CPU AdamW: 5x faster than its default per-tensor loop here).

Diagnostic (not what OpenVLA runs): the same step with the lm_head applied only at the supervised
positions, i.e. the FLOPs of vla_jax's step (`supervised_logits_loss`, checked equal to the real loss
before timing). Its steps alternate with the real ones, so both see the same machine; its ratio to
vla_jax separates our design's saving (no logits at ~310 unsupervised positions) from the two
compilers' kernel speed on the same work.

Threads: torch.set_num_threads(number of cores in the affinity mask). compare_torch.py starts this
process with OMP_WAIT_POLICY=PASSIVE (unless set): with the default spinning OpenMP barrier, any
other job on the same cores made torch 10-25x slower here, which would flatter the JAX side.

Inference, as OpenVLA's `predict_action`: tower features + projector + text embeddings into
`LlamaForCausalLM.generate(inputs_embeds=..., max_new_tokens=7, do_sample=False, use_cache=True)`,
then token -> bin center -> un-normalized float64 action in numpy. Images arrive already at the
model's resolution (the JAX side gets the same images).

`time` writes RUN/torch.json: timings, peak RSS (ru_maxrss of this process) and the RSS after set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_setup as cs  # noqa: E402

import torch  # noqa: E402

from tests.torch_reference import TorchOpenVLA, penultimate_features  # noqa: E402

IGNORE_INDEX = -100
# randomize() draws embeddings with std 0.02: next to the patch embeddings such tokens hardly change the
# last hidden state, and greedy decoding repeats one token 7 times. Std 1.0 makes the tokens differ,
# so the token-equality check compares 7 genuinely different decisions.
TOKEN_EMBED_SCALE = 50.0


def build_model(cfg, attn: str) -> TorchOpenVLA:
    model = TorchOpenVLA(cfg)
    model.language_model.set_attn_implementation(attn)
    return model


def _weight(model: TorchOpenVLA) -> torch.Tensor:
    """A weight of the model: its device and dtype (CPU fp32 here, bf16 on a GPU in gpu_suite)."""
    return model.projector["fc1"].weight


def multimodal_embeds(model: TorchOpenVLA, pixels: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
    """uint8 [B, S, S, 3] + ids [B, T] -> [B, T + P, D]: BOS, the P projected patches, the rest."""
    w = _weight(model)
    x = torch.from_numpy(pixels).to(w.device).permute(0, 3, 1, 2).float().div(255.0).to(w.dtype)
    feats = torch.cat([penultimate_features(model.featurizer, model._normalized(x, model.cfg.dino)),
                       penultimate_features(model.fused_featurizer, model._normalized(x, model.cfg.siglip))], dim=2)
    p = model.projector
    gelu = torch.nn.functional.gelu
    patches = p["fc3"](gelu(p["fc2"](gelu(p["fc1"](feats)))))
    text = model.language_model.get_input_embeddings()(input_ids)
    return torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)


def _multimodal_batch(model: TorchOpenVLA, batch: dict):
    """-> (embeds [B, T + P, D], attention mask [B, T + P], labels [B, T + P] with -100 on the patches)."""
    ids = torch.from_numpy(batch["input_ids"].astype(np.int64))
    labels = torch.from_numpy(batch["labels"].astype(np.int64))
    mask = torch.from_numpy(batch["attention_mask"].astype(np.int64))
    embeds = multimodal_embeds(model, batch["pixel_values"], ids)
    b, n_p = ids.shape[0], model.cfg.num_patches
    mm_labels = torch.cat([labels[:, :1], torch.full((b, n_p), IGNORE_INDEX, dtype=labels.dtype), labels[:, 1:]], 1)
    mm_mask = torch.cat([mask[:, :1], torch.ones((b, n_p), dtype=mask.dtype), mask[:, 1:]], 1)
    return embeds, mm_mask, mm_labels


def train_loss(model: TorchOpenVLA, batch: dict) -> torch.Tensor:
    """OpenVLA's training forward: full logits, HF's shifted CE; labels -100 on the patches."""
    embeds, mm_mask, mm_labels = _multimodal_batch(model, batch)
    return model.language_model(inputs_embeds=embeds, attention_mask=mm_mask, labels=mm_labels).loss


def supervised_logits_loss(model: TorchOpenVLA, batch: dict) -> torch.Tensor:
    """The same loss with the lm_head run only where a label is supervised (the diagnostic)."""
    embeds, mm_mask, mm_labels = _multimodal_batch(model, batch)
    hidden = model.language_model.model(inputs_embeds=embeds, attention_mask=mm_mask).last_hidden_state
    targets = mm_labels[:, 1:]
    picked = targets != IGNORE_INDEX
    logits = model.language_model.lm_head(hidden[:, :-1][picked])
    return torch.nn.functional.cross_entropy(logits.float(), targets[picked])


def make_optimizer(model: TorchOpenVLA) -> torch.optim.Optimizer:
    o = cs.OPTIM
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o["learning_rate"],
                             betas=(o["b1"], o["b2"]), eps=o["eps"], weight_decay=o["weight_decay"], fused=True)


def train_step(model: TorchOpenVLA, opt: torch.optim.Optimizer, batch: dict, loss_fn=train_loss) -> float:
    """One optimizer step; returns the loss before the update. Parameters that get no gradient (the
    towers' last block, final norms, SigLIP's MAP head: never run) are skipped by AdamW, as in OpenVLA."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cs.OPTIM["grad_clip"])
    opt.step()
    return float(loss.detach())


@torch.inference_mode()
def generate_tokens(model: TorchOpenVLA, pixels: np.ndarray, prompt: list) -> np.ndarray:
    """uint8 [B, S, S, 3] + one prompt for every row -> greedy tokens int64 [B, 7] (KV-cached generate)."""
    ids = torch.tensor([prompt] * pixels.shape[0], dtype=torch.int64, device=_weight(model).device)
    embeds = multimodal_embeds(model, pixels, ids)
    out = model.language_model.generate(
        inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.int64, device=ids.device),
        max_new_tokens=cs.NUM_TOKENS, min_new_tokens=cs.NUM_TOKENS, do_sample=False, use_cache=True,
        eos_token_id=None, pad_token_id=model.cfg.pad_token_id)
    return out[:, -cs.NUM_TOKENS:].cpu().numpy()


def tokens_to_actions(tokens: np.ndarray, cfg) -> np.ndarray:
    """OpenVLA's decode: vocab_size - id - 1 -> bin center (float64), then q01/q99 un-normalization
    with the benchmark's statistics (the same as the JAX side's Policy)."""
    bins = np.linspace(-1.0, 1.0, cfg.n_action_bins)
    centers = (bins[:-1] + bins[1:]) / 2.0
    a = centers[np.clip(cfg.base_vocab_size - tokens.astype(np.int64) - 1, 0, centers.shape[0] - 1)]
    q01, q99, mask = (np.asarray(x) for x in cs.action_stats())
    return np.where(mask, 0.5 * (a + 1.0) * (q99 - q01) + q01, a)


def prepare(setup: str, run_dir: str, attn: str) -> None:
    from vla_jax.tokenizer import VLATokenizer

    s, cfg = cs.SETUPS[setup], cs.model_config(setup)
    torch.manual_seed(0)
    model = build_model(cfg, attn).randomize(seed=0)
    with torch.no_grad():  # unit-scale token embeddings: generated tokens then steer the next ones
        model.language_model.get_input_embeddings().weight.mul_(TOKEN_EMBED_SCALE)
    np.savez(os.path.join(run_dir, "weights.npz"), **model.hf_state_dict())
    batch = cs.training_batch(setup)
    rng = np.random.default_rng(1)
    batch["images"] = rng.integers(0, 256, (max(cs.INFER_BATCHES), s["image_size"], s["image_size"], 3), np.uint8)
    np.savez(os.path.join(run_dir, "batch.npz"), **batch)
    prompt = VLATokenizer.from_file(cs.tokenizer_path()).inference_ids(cs.INSTRUCTION)
    tokens = generate_tokens(model, batch["images"][:1], prompt)[0]
    model.train()
    opt = make_optimizer(model)
    loss0 = train_step(model, opt, batch)
    with torch.no_grad():
        loss1 = float(train_loss(model, batch))
    ref = {"setup": setup, "loss_step0": loss0, "loss_after_step": loss1, "tokens": tokens.tolist(),
           "prompt_ids": prompt, "distinct_tokens": int(len(set(tokens.tolist())))}
    with open(os.path.join(run_dir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
    print(f"torch prepare {setup}: loss {loss0:.6f} -> {loss1:.6f}, tokens {tokens.tolist()}", flush=True)


def time_side(setup: str, run_dir: str, train_reps: int, infer_reps: int, batch_reps: int, attn: str) -> dict:
    info = cs.process_info()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = cs.model_config(setup)
    with open(os.path.join(run_dir, "reference.json")) as f:
        ref = json.load(f)
    batch = dict(np.load(os.path.join(run_dir, "batch.npz")))
    model = build_model(cfg, attn)
    model.load_hf_state_dict(dict(np.load(os.path.join(run_dir, "weights.npz"))))
    out = {"side": "torch", "setup": setup, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "attn_implementation": attn, "start": info, "rss_after_setup_mb": cs.rss_mb()}

    # Inference first (the model as loaded), then training (which changes the weights).
    model.eval()
    prompt, images = ref["prompt_ids"], batch["images"]
    tokens = generate_tokens(model, images[:1], prompt)[0]
    if tokens.tolist() != ref["tokens"]:
        raise AssertionError(f"torch tokens {tokens.tolist()} != reference {ref['tokens']}")
    infer = {}
    for b in cs.INFER_BATCHES:
        px = images[:b]
        reps = infer_reps if b == 1 else batch_reps
        t = cs.time_calls(lambda: tokens_to_actions(generate_tokens(model, px, prompt), cfg), reps)
        t.update(ms_per_action=round(t["median_ms"] / b, 3), actions_per_s=round(1e3 * b / t["median_ms"], 2))
        infer[str(b)] = t
    out["inference"] = infer

    model.train()
    with torch.no_grad():
        full, picked = float(train_loss(model, batch)), float(supervised_logits_loss(model, batch))
    if abs(full - picked) > cs.LOSS_RTOL * abs(full):
        raise AssertionError(f"torch: loss with logits at the supervised positions only {picked} "
                             f"!= full-logits loss {full}")
    opt = make_optimizer(model)
    runs = {"train": (train_loss, [], [], []), "train_supervised_logits": (supervised_logits_loss, [], [], [])}
    for i in range(train_reps + 2):  # 2 warm-up steps each (allocator, AdamW state creation)
        for loss_fn, step_times, cpu_times, losses in runs.values():  # the two kinds of step alternate
            c0, t0 = time.process_time(), time.perf_counter()
            losses.append(train_step(model, opt, batch, loss_fn))
            if i >= 2:
                step_times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    losses = runs["train"][3]
    if abs(losses[0] - ref["loss_step0"]) > cs.LOSS_RTOL * abs(ref["loss_step0"]):
        raise AssertionError(f"torch loss {losses[0]} != reference {ref['loss_step0']}")
    for name, (_, step_times, cpu_times, losses) in runs.items():
        t = cs.summarize(step_times, cpu_times)
        t.update(batch=int(batch["input_ids"].shape[0]),
                 samples_per_s=round(batch["input_ids"].shape[0] * 1e3 / t["median_ms"], 3),
                 loss_first=losses[0], loss_last=losses[-1])
        out[name] = t
    out["peak_rss_mb"] = cs.peak_rss_mb()
    out["end"] = cs.process_info()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("prepare", "time"))
    p.add_argument("--setup", choices=sorted(cs.SETUPS), required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--train-reps", type=int, default=20)
    p.add_argument("--infer-reps", type=int, default=20)
    p.add_argument("--batch-reps", type=int, default=5)
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    a = p.parse_args(argv)
    if a.mode == "prepare":
        prepare(a.setup, a.dir, a.attn)
        return 0
    res = time_side(a.setup, a.dir, a.train_reps, a.infer_reps, a.batch_reps, a.attn)
    with open(os.path.join(a.dir, "torch.json"), "w") as f:
        json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
