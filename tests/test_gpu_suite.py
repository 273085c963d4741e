"""bench/gpu_suite.py runs end to end on CPU with the tiny preset, so a lent accelerator is never its
first run: every part produces its fields, finite and positive."""

import importlib.util
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(REPO, "bench", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report():
    suite = _load_suite()
    # fp32 (bf16 is emulated on CPU and compiles slower); 2 steps, batch sizes 1 and 2.
    return suite.main(["--preset=tiny", "--quick", "--dtype=float32", "--train-layers=0", "--text-len=16",
                       "--prompt-len=10", "--prompt-bucket=16", "--budget-s=1000"])


def test_every_part_ran(report):
    assert report["skipped"] == []
    for part in ("inference", "train_full", "train_lora", "torch_generate"):
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
    for b in ("batch1", "batch2"):
        assert _positive(t[b]["median_ms"]) and _positive(t[b]["actions_per_s"]) and t[b]["n"] >= 1
    assert report["speedup_vs_torch"] == round(t["ms_per_action_batch1"] / report["inference"]["ms_per_action_batch1"], 3)


def test_decode_probe_runs_and_both_layouts_agree():
    """bench/gpu_decode_probe.py (the stacked-vs-per-layer decoding probe) runs on CPU, and in fp32 the
    stacked layout (OpenVLA.prefill/decode_step over the scanned layers) and the shipped per-layer
    decoder pick the same 7 tokens for every row."""
    spec = importlib.util.spec_from_file_location("gpu_decode_probe", os.path.join(REPO, "bench", "gpu_decode_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    r = probe.main(["--preset=tiny", "--dtype=float32", "--reps=1", "--batch=3", "--prompt-len=10", "--prompt-bucket=16"])
    assert len(r["scan"]["tokens"]) == 3 and len(r["scan"]["tokens"][0]) == 7
    assert r["per_layer"]["tokens"] == r["scan"]["tokens"] and r["per_layer"]["tokens_equal_first_variant"]
    assert len({t for row in r["scan"]["tokens"] for t in row}) > 3, "degenerate tokens: the comparison would be weak"
    for key in ("scan", "prefill", "per_layer"):
        assert _positive(r[key]["median_ms"]) and _positive(r[key]["compile_s"])
