"""bench/gpu_suite.py runs end to end on CPU with the tiny preset, so a lent accelerator is never its
first run: every part produces its fields, and the derived fields are what their definitions say
(the hardware limit from the geometry's FLOPs and weight bytes, MFU and throughput from the raw
timings and the model FLOPs, parameter counts from the model's own parameter tree)."""

import importlib.util
import math
import os

import pytest

pytestmark = pytest.mark.slow  # the accelerator suite's full CPU run (four parts, a torch child process)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(REPO, "bench", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


TEXT_LEN, PROMPT_LEN = 16, 10


@pytest.fixture(scope="module")
def report():
    suite = _load_suite()
    # fp32 (bf16 is emulated on CPU and compiles slower); 2 steps, batch sizes 1 and 2.
    return suite.main(["--preset=tiny", "--quick", "--dtype=float32", "--train-layers=0", f"--text-len={TEXT_LEN}",
                       f"--prompt-len={PROMPT_LEN}", "--prompt-bucket=16", "--budget-s=1000"])


def test_every_part_ran(report):
    assert report["skipped"] == []
    for part in ("inference", "oft_inference", "train_full", "train_lora", "torch_generate"):
        assert "error" not in report[part], report[part].get("error")
        assert _positive(report[part]["wall_s"])


def test_inference_fields(report):
    inf = report["inference"]
    for key in ("ms_per_action_batch1", "compile_s_all_buckets", "fraction_of_limit", "params"):
        assert _positive(inf[key]), (key, inf[key])
    for b in ("batch1", "batch2"):
        assert _positive(inf[b]["median_ms"]) and _positive(inf[b]["actions_per_s"]) and inf[b]["n"] >= 1
    lim = inf["limit"]
    assert all(_positive(lim[k]) for k in ("prefill_tflop", "decode_step_gb", "limit_ms_per_action", "limit_hz"))
    assert _positive(inf["memory"]["host_peak_rss_gb"])
    for b in (1, 2):
        t = inf[f"batch{b}"]
        assert t["ms_per_action"] == round(t["median_ms"] / b, 3)
        assert t["actions_per_s"] == round(1e3 * b / t["median_ms"], 2)
    assert inf["ms_per_action_batch1"] == inf["batch1"]["median_ms"]


def _llm_weights_without_embedding(cfg) -> int:
    """Parameters of the LLM's layers, final norm and lm_head, counted on the model's own (abstract)
    parameter tree: what each cached decoding step reads."""
    import flax.linen as nn
    import jax
    import numpy as np

    from vla_jax.models.openvla import OpenVLA

    s = cfg.image_size
    shapes = nn.meta.unbox(jax.eval_shape(lambda: OpenVLA(cfg).init(
        jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8), np.ones((1, 4), np.int32))))["params"]["llm"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    embed = [jax.tree_util.keystr(p) for p, _ in flat if "embed" in jax.tree_util.keystr(p)]
    assert len(embed) == 1, embed  # exactly one embedding table is left out
    return sum(math.prod(x.shape) for p, x in flat if "embed" not in jax.tree_util.keystr(p))


def test_inference_limit_is_the_geometry_over_the_peaks(report):
    """limit = prefill FLOPs (the analytic count test_train_configs checks against XLA's) / peak FLOP/s
    + 6 cached steps x LLM weight bytes / bandwidth, from the reported peaks; the fraction of the
    limit divides it by the measured batch-1 latency."""
    from vla_jax.training import metrics as mlib

    suite = _load_suite()
    cfg = suite.model_config("tiny", "float32", "float32", remat=False)
    inf, lim = report["inference"], report["inference"]["limit"]
    flops = sum(mlib.forward_flops(cfg, PROMPT_LEN, 1).values())
    weight_bytes = 4 * _llm_weights_without_embedding(cfg)
    assert lim["prefill_tflop"] == round(flops / 1e12, 6)
    assert lim["decode_step_gb"] == round(weight_bytes / 1e9, 6)
    ms = 1e3 * (flops / (report["peak_tflops_used"] * 1e12) + 6 * weight_bytes / (report["peak_tbps_used"] * 1e12))
    assert lim["limit_ms_per_action"] == pytest.approx(ms, rel=1e-6, abs=1e-4)
    assert lim["limit_hz"] == pytest.approx(1e3 / ms, abs=0.051)
    assert inf["fraction_of_limit"] == pytest.approx(lim["limit_ms_per_action"] / inf["ms_per_action_batch1"],
                                                     rel=1e-5, abs=1e-6)
    assert 0 < inf["fraction_of_limit"] < 1  # nothing beats the hardware bound


def _oft_flops_per_row(cfg, prompt_len: int) -> float:
    """One OFT pass, by hand from the geometry: towers + projector (`vla_jax.training.metrics`, checked
    against XLA's count in test_train_configs), the Llama over all S rows minus the S - A rows the last
    layer skips (queries, outputs, scores/values and MLP), the L1 head (LN, D*H -> H, 2 x H -> H, H -> D)."""
    from vla_jax.training import metrics as mlib

    lc, a, d = cfg.llama, cfg.num_action_slots, cfg.llama.hidden_size
    text = prompt_len + a + 1
    s = text + cfg.num_patches
    every_row = sum(mlib.forward_flops(cfg, text, 0).values())
    skipped = (s - a) * (4.0 * d * lc.num_heads * lc.head_dim + 4.0 * s * lc.num_heads * lc.head_dim
                         + 6.0 * d * lc.intermediate_size)
    return every_row - skipped + 2.0 * cfg.chunk_size * (cfg.action_dim * d * d + 2 * d * d + d * cfg.action_dim)


def _oft_bytes_read(cfg) -> int:
    """Bytes of the parameters one OFT pass reads, found by running it: every leaf with a nonzero
    gradient of the pass's output (the embedding table, of which the pass reads a few rows, aside)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import parallel_decode

    model = OpenVLA(cfg)
    s = cfg.image_size
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8), np.ones((1, 4), np.int32))["params"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8)
    prompt = np.array([[1] + rng.integers(3, 32000, PROMPT_LEN - 2).tolist() + [29871]], np.int32)
    grads = jax.grad(lambda p: jnp.sum(parallel_decode(model, p, images, prompt, np.array([PROMPT_LEN], np.int32))))(
        params)
    total = 0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if "embed_tokens" not in jax.tree_util.keystr(path) and bool(jnp.any(g != 0)):
            total += g.size * g.dtype.itemsize
    return total


def test_oft_inference_fields_and_limit(report):
    """Every batch size measured; actions/s = batch x K / median call; the limit = the larger of the
    pass's FLOPs at the peak and its weight reads at the bandwidth, with FLOPs counted by hand and the
    bytes found by running the pass (nonzero gradients), not by the suite's own accounting."""
    suite = _load_suite()
    oft = report["oft_inference"]
    cfg = suite.oft_config(suite.parse(["--preset=tiny", "--dtype=float32"]))
    assert oft["chunk_size"] == cfg.chunk_size == 8 and oft["action_head"] == "l1"
    assert _positive(oft["compile_s_all_buckets"]) and _positive(oft["memory"]["host_peak_rss_gb"])
    flops, weight_bytes = _oft_flops_per_row(cfg, PROMPT_LEN), _oft_bytes_read(cfg)
    assert oft["flops_per_row"] == pytest.approx(flops, rel=1e-9)
    peak, bandwidth = report["peak_tflops_used"] * 1e12, report["peak_tbps_used"] * 1e12
    for b in (1, 2):
        t, lim = oft[f"batch{b}"], oft[f"batch{b}"]["limit"]
        assert _positive(t["median_ms"]) and t["n"] >= 1
        assert t["actions_per_s"] == round(1e3 * b * 8 / t["median_ms"], 2)
        assert lim["tflop"] == round(b * flops / 1e12, 6)
        assert lim["weight_gb"] == pytest.approx(weight_bytes / 1e9, abs=1e-6)
        ms = 1e3 * max(b * flops / peak, weight_bytes / bandwidth)
        assert lim["limit_ms_per_pass"] == pytest.approx(ms, rel=1e-4, abs=1e-4)
        assert lim["limit_actions_per_s"] == pytest.approx(1e3 * b * 8 / ms, rel=1e-3, abs=0.051)
        assert t["fraction_of_limit"] == pytest.approx(t["actions_per_s"] / lim["limit_actions_per_s"], rel=1e-4)
        assert 0 < t["fraction_of_limit"] < 1
    assert oft["actions_per_s_batch1"] == oft["batch1"]["actions_per_s"]
    assert oft["reference_actions_per_s"] == {"openvla_oft_pytorch_a100_batch1": 109.7}


def test_oft_hardware_limit_at_7b():
    """The 7B OFT pass (24 prompt tokens, K=8, one image) by hand: Llama 4.328 TFLOP (31 layers over
    337 rows + the last at 56), towers 0.369, projector 0.037, head 0.002 = ~4.74 TFLOP; weights read
    7,541,237,184 - 262.7M (embedding, lm_head) - 43.1M (never-run tower parts) + 151.1M (head) =
    ~7.387B x 2 bytes = ~14.77 GB. H100 SXM: 4.79 ms > 4.41 ms -> ~1,670 actions/s; A100 (312 TFLOP/s,
    2.039 TB/s): 15.2 ms -> ~527 actions/s, against upstream's 109.7."""
    suite = _load_suite()
    from oft_limits import oft_hardware_limit, oft_pass_flops, oft_weight_bytes
    from vla_jax.models.openvla import OpenVLA

    cfg = suite.oft_config(suite.parse(["--preset=openvla-7b"]))
    flops = sum(oft_pass_flops(cfg, 24).values())
    weight_bytes = oft_weight_bytes(OpenVLA(cfg), cfg)
    assert abs(flops / 1e12 - 4.735) < 0.01, flops
    assert abs(weight_bytes / 1e9 - 14.77) < 0.02, weight_bytes
    h100 = oft_hardware_limit(flops, weight_bytes, 1, 8, 989e12, 3.35e12)
    assert 4.7 < h100["compute_ms"] < 4.9 and 4.3 < h100["memory_ms"] < 4.5 and h100["limit_ms_per_pass"] == h100["compute_ms"]
    assert 1640 < h100["limit_actions_per_s"] < 1700, h100
    a100 = oft_hardware_limit(flops, weight_bytes, 1, 8, 312e12, 2.039e12)
    assert 515 < a100["limit_actions_per_s"] < 540, a100


def test_train_fields(report):
    full, lora = report["train_full"], report["train_lora"]
    for part in (full, lora):
        for key in ("tokens_per_s", "mfu", "achieved_tflops", "step_median_ms", "compile_s", "model_tflop_per_step"):
            assert _positive(part[key]), (key, part[key])
        assert part["finite"] and _positive(part["memory"]["host_peak_rss_gb"])
    # Full fine-tuning trains every used parameter; LoRA only its adapters (far fewer than the model).
    assert full["trainable"] > 0.5 * full["params"]
    assert 0 < lora["trainable"] < 0.5 * lora["params"]
    assert lora["lora"] and not full["lora"]


def test_train_throughput_and_mfu_follow_from_the_raw_fields(report):
    """model FLOPs = batch x train_flops_per_example (every part trained: x3 of the forward, for full
    fine-tuning and for LoRA alike); tokens/s, achieved TFLOP/s and MFU = those counts over the
    measured median step time and the reported peak."""
    from vla_jax.training import metrics as mlib

    suite = _load_suite()
    peak = report["peak_tflops_used"] * 1e12
    for name in ("train_full", "train_lora"):
        part = report[name]
        cfg = suite.model_config("tiny", "float32", "float32", remat=True)
        assert part["tokens_per_example"] == TEXT_LEN + (cfg.image_size // cfg.dino.patch_size) ** 2
        flops = part["batch"] * 3 * sum(mlib.forward_flops(cfg, TEXT_LEN, 8).values())
        assert part["model_tflop_per_step"] == round(flops / 1e12, 6), name
        sec = part["step_median_ms"] / 1e3
        assert part["achieved_tflops"] == pytest.approx(flops / sec / 1e12, rel=1e-9, abs=1e-6), name
        assert part["mfu"] == pytest.approx(flops / sec / peak, rel=1e-9, abs=1e-8), name
        assert part["tokens_per_s"] == pytest.approx(part["batch"] * part["tokens_per_example"] / sec, abs=0.051)
        assert part["step_p90_ms"] >= part["step_median_ms"]


def test_hardware_limit_matches_the_issue_numbers():
    """The 7B batch-1 bound from geometry alone: ~4.1 TFLOP prefill, ~13.2 GB per cached step, ~28 ms
    on an H100 SXM (989 TFLOP/s, 3.35 TB/s), as computed by hand in the performance issue."""
    suite = _load_suite()
    cfg = suite.model_config("openvla-7b", "bfloat16", "bfloat16", remat=False)
    lim = suite.hardware_limit(cfg, 24, 989e12, 3.35e12)
    assert abs(lim["prefill_tflop"] - 4.1) < 0.2, lim
    assert abs(lim["decode_step_gb"] - 13.2) < 0.1, lim
    assert 26.0 < lim["limit_ms_per_action"] < 30.0, lim


def test_torch_baseline_fields(report):
    """The PyTorch generate baseline ran in its child process at every batch size, and the ratio is
    the quotient of the two batch-1 latencies."""
    t = report["torch_generate"]
    assert t["params"] == report["inference"]["params"], (t["params"], report["inference"]["params"])
    # ... and both equal the tiny preset's parameter count, from the model's own tree.
    import flax.linen as nn
    import jax
    import numpy as np

    from vla_jax.models.openvla import OpenVLA

    cfg = _load_suite().model_config("tiny", "float32", "float32", remat=False)
    s = cfg.image_size
    shapes = jax.eval_shape(lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8),
                                                      np.ones((1, 4), np.int32)))
    assert t["params"] == sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    for b in ("batch1", "batch2"):
        assert _positive(t[b]["median_ms"]) and _positive(t[b]["actions_per_s"]) and t[b]["n"] >= 1
    assert report["speedup_vs_torch"] == round(t["ms_per_action_batch1"] / report["inference"]["ms_per_action_batch1"], 3)
