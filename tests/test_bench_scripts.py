"""The real-size benchmark scripts, run at tiny size so they cannot rot.

``benchmarks/bench_real.py`` and ``benchmarks/gpu.py --tiny`` run in process (the
imports are shared with the rest of the suite), on the tiny stand-ins of the study's
architectures, with torch held to one thread while they run.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in ("real_models", "bench_real", "gpu")}
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_gemma_config_is_transformer_lens_own(scripts) -> None:
    """Field for field what TransformerLens derives for google/gemma-2b (a hard-coded branch: no hub)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    theirs = convert_hf_model_config("google/gemma-2b")
    ours = scripts["real_models"].tl_config("gemma-2b", n_ctx=8192)
    assert theirs["n_layers"] == 18 and ours.n_layers == 18
    ref = HookedTransformerConfig(**{k: v for k, v in theirs.items() if k not in ("tokenizer_name", "quantization_method")})
    for key in theirs:
        if key in ("tokenizer_name", "quantization_method"):
            continue
        assert getattr(ours, key) == getattr(ref, key), key


def test_mistral_config_is_transformer_lens_own(scripts, monkeypatch) -> None:
    """What TransformerLens derives from Mistral-7B-v0.1's config.json (served locally here)."""
    import transformers
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as lfp

    v01 = transformers.MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32000, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
        sliding_window=4096, architectures=["MistralForCausalLM"],
    )
    monkeypatch.setattr(lfp.AutoConfig, "from_pretrained", lambda *a, **k: v01)
    theirs = lfp.convert_hf_model_config("mistralai/Mistral-7B-v0.1")
    ours = scripts["real_models"].tl_config("mistral-7b", n_ctx=2048)
    ref = HookedTransformerConfig(**{k: v for k, v in theirs.items() if k not in ("tokenizer_name", "quantization_method")})
    for key in theirs:
        if key in ("tokenizer_name", "quantization_method"):
            continue
        assert getattr(ours, key) == getattr(ref, key), key


def test_depth_cut_keeps_or_moves_the_hook(scripts) -> None:
    rm = scripts["real_models"]
    assert rm.hook_for_depth("gemma-2b", 8) == ("blocks.6.hook_resid_post", None)
    hook, note = rm.hook_for_depth("gemma-2b", 3)
    assert hook == "blocks.2.hook_resid_post" and "moved" in note
    assert rm.hook_for_depth("mistral-7b", 9) == ("blocks.8.hook_resid_pre", None)
    assert rm.hook_for_depth("mistral-7b", 2)[0] == "blocks.1.hook_resid_pre"
    assert rm.start_layer("blocks.6.hook_resid_post") == 7 and rm.start_layer("blocks.8.hook_resid_pre") == 8


def test_tiny_setup_is_sane(scripts, one_thread) -> None:
    rm = scripts["real_models"]
    s = rm.build("tiny-gemma", n_ctx=32, context_size=32, rel_noise=0.05)
    assert torch.equal(s.base.embed.W_E, s.base.unembed.W_U.T * s.arch.embed_scale)  # tied, scaled
    assert torch.equal(s.finetune.embed.W_E, s.finetune.unembed.W_U.T * s.arch.embed_scale)
    toks = s.tokens(256, 32)
    with torch.no_grad():
        loss = float(s.base(toks, return_type="loss"))
        x = s.base(toks, stop_at_layer=s.start_layer)[:, 1:]
        l0 = float((s.sae.encode(x) > 0).float().sum(-1).mean())
    assert math.isfinite(loss) and abs(loss - math.log(s.base.cfg.d_vocab)) < 1.5
    assert 0.3 * s.arch.l0 < l0 < 3 * s.arch.l0  # the calibrated SAE is about as sparse as asked
    bf = rm.cast_copy(s.base, torch.bfloat16)
    assert next(bf.parameters()).dtype == torch.bfloat16 and bf.cfg.dtype == torch.bfloat16


def test_bench_real_tiny(scripts, one_thread, tmp_path) -> None:
    out = tmp_path / "real.json"
    t = time.perf_counter()
    rc = scripts["bench_real"].main([
        "--arch", "tiny-mistral", "--tokens", "128", "256", "--context-size", "32", "--batch-size", "4",
        "--n-bootstrap", "100", "--json", str(out),
    ])
    assert rc == 0
    doc = json.loads(out.read_text())
    sides = doc["summary"]["sides"]
    assert set(sides) == {"engine", "saelens", "floor"}
    for side in sides.values():
        assert set(side["by_tokens"]) == {"128", "256"}
        assert "marginal_s_per_token_wall" in side and "fixed_s_wall" in side
        assert all(v["peak_rss_mb"] > 0 for v in side["by_tokens"].values())
    assert doc["summary"]["ratios"]["engine_over_floor_marginal_time_cpu"] is not None
    assert doc["summary"]["ratios"]["engine_over_saelens_marginal_time_cpu"] is not None
    runs = {(r["side"], r["n_tokens"]): r for r in doc["runs"]}
    eng, sl = runs[("engine", 256)]["check"], runs[("saelens", 256)]["check"]
    # the same job both ways: the sae_lens side's numbers agree with the engine's
    assert eng["ft.ce_loss_spliced"] == pytest.approx(sl["ft.ce_loss_spliced"], rel=1e-4)
    assert eng["logit_similarity_mean"] == pytest.approx(sl["logit_similarity_mean"], abs=1e-6)
    assert eng["n_regular_features"] == sl["n_regular_features"] > 0
    assert doc["engine_fixed_cost"]["logit_similarity_alone"] >= 0
    print(f"bench_real tiny: {time.perf_counter() - t:.1f} s")


def test_gpu_script_tiny(scripts, one_thread, tmp_path) -> None:
    out = tmp_path / "gpu.json"
    t = time.perf_counter()
    assert scripts["gpu"].main(["--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["tiny"] and set(doc["parts"]) == {"check", "gemma", "mistral"}
    chk = doc["parts"]["check"]
    assert chk["passed"], chk["metrics"]
    assert all(row["ok"] for row in chk["metrics"].values())
    for name, sides in (("gemma", {"engine", "saelens", "floor"}), ("mistral", {"engine", "floor", "saelens"})):
        part = doc["parts"][name]
        assert "error" not in part, part.get("traceback")
        assert {r["side"] for r in part["runs"]} == sides
        assert not any(r.get("aborted") for r in part["runs"])
    assert "logit_similarity" in doc["parts"]["gemma"]
    print(f"gpu.py --tiny: {time.perf_counter() - t:.1f} s")


def test_gpu_script_budget_spent_skips_parts(scripts, tmp_path) -> None:
    out = tmp_path / "gpu.json"
    assert scripts["gpu"].main(["--tiny", "--out", str(out), "--budget-s", "0.001"]) == 0
    doc = json.loads(out.read_text())
    assert doc["parts"] == {} and len(doc["skipped"]) == 3


def test_time_guard_plan(scripts) -> None:
    plan = scripts["gpu"].plan_big_count
    rate = {"engine": 1e-3, "floor": 1e-3, "saelens": 4e-3}
    # everything fits
    n, sides, notes = plan(rate, ["engine", "floor"], ["saelens"], 65536, 16384, 8192, left=1000.0)
    assert n == 65536 and sides == ["engine", "floor", "saelens"] and notes == []
    # the optional side does not fit; the others do
    n, sides, notes = plan(rate, ["engine", "floor"], ["saelens"], 65536, 16384, 8192, left=200.0)
    assert n == 65536 and sides == ["engine", "floor"] and "saelens left out" in notes[0]
    # the target does not fit: cut to whole batches that do
    n, sides, notes = plan(rate, ["engine", "floor"], [], 65536, 16384, 8192, left=100.0)
    assert n == 49152 and n * 2e-3 <= 100.0 and "cut from 65536 to 49152" in notes[0]
    # not even a second count
    n, sides, notes = plan(rate, ["engine", "floor"], [], 65536, 16384, 8192, left=10.0)
    assert sides == [] and "no time for a second token count" in notes[0]


def test_deadline_guard_stops_the_engine(scripts, one_thread) -> None:
    rm, br = scripts["real_models"], scripts["bench_real"]
    s = rm.build("tiny-gemma", n_ctx=32, context_size=32)
    toks = s.tokens(256, 32, 4)
    handles = br.deadline_guard([s.base, s.finetune], time.perf_counter() - 1.0)
    try:
        with pytest.raises(br.DeadlineExceeded):
            br.side_engine(s, toks, 4, n_bootstrap=10)
    finally:
        for h in handles:
            h.remove()
    assert br.side_engine(s, toks, 4, n_bootstrap=10)["n_tokens"] == 256  # hooks gone


def test_a_failing_side_is_recorded_not_raised(scripts, one_thread) -> None:
    gpu, rm = scripts["gpu"], scripts["real_models"]
    s = rm.build("tiny-gemma", n_ctx=32, context_size=32)
    toks = s.tokens(128, 32, 4)
    rec = gpu.timed_side("no-such-side", s, toks, gpu.Args(4), torch.device("cpu"), time.perf_counter() + 60)
    assert rec["aborted"].startswith("error: ValueError") and rec["n_tokens"] == 128
    late = gpu.timed_side("floor", s, toks, gpu.Args(4), torch.device("cpu"), time.perf_counter() - 1)
    assert late["aborted"] == "stopped by the time guard"


def test_bench_family_sides_measure_the_same_work(one_thread) -> None:
    """bench_family's one-pass and separate-runs sides give every SAE the same CE delta (same
    tokens, same engine), so its time ratio compares like with like."""
    import argparse

    sys.path.insert(0, str(BENCH))
    try:
        bench_family = importlib.import_module("bench_family")
        args = argparse.Namespace(threads=1, finetune="toy-code", context_size=128, batch_size=4)
        multi = bench_family.child_run("multi", 1024, args)
        separate = bench_family.child_run("separate", 1024, args)
    finally:
        sys.path.remove(str(BENCH))
    assert multi["n_tokens"] == separate["n_tokens"] == 1024
    assert set(multi["check"]) == set(separate["check"]) == set(bench_family.FAMILY)
    for sid in bench_family.FAMILY:
        assert multi["check"][sid] == pytest.approx(separate["check"][sid], rel=1e-6, abs=1e-7), sid
