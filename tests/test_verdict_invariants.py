"""What the default gate must do whatever the SAE and the model, through the real plugin.

* A finetune identical to its base passes, however weak the SAE is on that base (random
  and degraded SAEs, standard and TopK, spliced-loss penalties from under 0.1 to over 2
  nats on the base), and a weak SAE shows a warning about its own quality.
* A finetune that only adds small noise to the weights passes; one whose layers before
  the hook were re-initialised fails.
* The verdict depends neither on ``--sae-batch-size`` nor on the order of ``--finetune``.

Every run is ``pytest`` with the plugin (``pytest.main`` in this process, as the
reliability suite does) on real models: the toy zoo's ``toy-base`` with SAEs built here
with sae_lens, and tiny GPT-2 checkpoints written with ``save_pretrained`` with an SAE
trained here on their activations.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE / "reliability"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from rel_runner import Run, offline_single_thread, run_inprocess  # noqa: E402

from pytest_sae_transfer.thresholds import explain_verdict  # noqa: E402

TOY_TOKENS = "1024"
TINY_TOKENS = "2048"
TINY_HOOK = "blocks.1.hook_resid_post"
TINY_HIDDEN, TINY_LAYERS, TINY_CTX = 64, 3, 32

_runs = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _offline_and_one_thread() -> Any:
    with offline_single_thread():
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("invariants")


def _run(root: Path, *args: str) -> Run:
    return run_inprocess(root / f"run{next(_runs)}", *args)


def _hard_failures(report: dict[str, Any], model: str) -> list[str]:
    ft = next(f for f in report["finetunes"] if f["model"].endswith(model))
    return [c["message"] for c in ft["checks"] if not c["passed"] and c["severity"] == "fail"]


# ---------------------------------------------------------------------------- SAEs on toy-base


def degraded_zoo_sae(directory: Path, sae_id: str | None, q: float, seed: int) -> Path:
    """The zoo's SAE with a share ``q`` of each weight replaced by random values of the same
    norm (q = 0: as trained; q = 1: random), saved with sae_lens."""
    from pytest_sae_transfer import zoo

    sae = zoo.load_sae("toy-res", sae_id)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc"):
            p = getattr(sae, name)
            noise = torch.randn(p.shape, generator=gen)
            noise *= p.norm() / noise.norm()
            p.mul_(1 - q).add_(q * noise)
    sae.save_model(str(directory))
    return directory


def _toy_args(sae_dir: Path, *finetunes: str, tokens: str = TOY_TOKENS) -> list[str]:
    args = ["--sae-path", str(sae_dir), "--base-model", "toy-base", "--sae-dataset", "toy-eval", "--sae-tokens", tokens,
            "--sae-thresholds", "default", "--sae-report", "r.json", "--sae-no-cache", "-rA"]
    for ft in finetunes:
        args += ["--finetune", ft]
    return args


ZOO_IDS = {"standard": None, "topk": "blocks.1.hook_resid_post-topk"}


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(sorted(ZOO_IDS)), q=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
@example(arch="standard", q=1.0, seed=0)  # a random SAE: over 2 nats on the base
@example(arch="topk", q=1.0, seed=1)
@example(arch="topk", q=0.0, seed=0)  # the zoo's trained SAE
@example(arch="standard", q=0.5, seed=2)  # deliberately weak: ~0.8 nats
def test_identical_finetune_passes_whatever_the_sae(workdir: Path, arch: str, q: float, seed: int) -> None:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        sae_dir = degraded_zoo_sae(Path(tmp) / "sae", ZOO_IDS[arch], q, seed)
        run = _run(workdir, *_toy_args(sae_dir, "toy-base"))
    report = run.report()
    base = report["base"]["metrics"]
    assert run.ret == 0, f"{arch} q={q}: base CE penalty {base['ce_loss_delta']}\n{_hard_failures(report, 'toy-base')}\n{run.text[-3000:]}"
    assert report["finetunes"][0]["passed"] is True
    if q == 1.0:
        assert base["ce_loss_delta"] > 1.0, "the random SAE should be far from useful on the base"
    if q == 0.0:
        assert base["ce_loss_delta"] < 0.2
    if base["ce_loss_recovered"] < 0.9:  # the SAE is weak: the user is told, apart from the verdict
        assert "SAETransferWarning" in run.text and "the SAE's own quality on the base model" in run.text
        text = explain_verdict(_checks(report, "toy-base"), "toy-base", "toy-base")
        assert text.status == "PASS" and text.sae_warnings and "transfer verdicts on it mean little" in text.sae_warnings[0]


def _checks(report: dict[str, Any], model: str) -> list[Any]:
    from pytest_sae_transfer.report import CheckResult

    ft = next(f for f in report["finetunes"] if f["model"] == model)
    return [CheckResult.from_json(c) for c in ft["checks"]]


def test_tried_as_a_new_user_would_with_a_weak_sae(workdir: Path) -> None:
    """An SAE about 0.6 nats worse than clean on its base: the unchanged model passes with a
    visible warning about the SAE; the heavy code finetune fails, with its reason in one line."""
    sae_dir = degraded_zoo_sae(workdir / "weak_sae", ZOO_IDS["topk"], 0.45, seed=3)
    run = _run(workdir, *_toy_args(sae_dir, "toy-base", "toy-code", tokens="2048"))
    report = run.report()
    assert 0.4 < report["base"]["metrics"]["ce_loss_delta"] < 1.2, report["base"]["metrics"]
    assert run.ret == 1, run.text[-3000:]
    same, code = report["finetunes"]
    assert same["passed"] is True and code["passed"] is False
    assert "SAETransferWarning: toy-base: base.ce_loss_recovered" in run.text
    passed_lines = [line for line in run.text.splitlines() if line.startswith(("PASSED toy-base::", "FAILED toy-base::"))]
    assert passed_lines and all(line.startswith("PASSED") for line in passed_lines)
    text = explain_verdict(_checks(report, "toy-code"), "toy-base", "toy-code")
    assert text.status == "FAIL" and text.lines[0].startswith("FAIL: on toy-code the SAE ")
    assert "\n" not in text.lines[0] and len(text.lines) <= 2
    assert text.sae_warnings and "weak on toy-base itself" in text.sae_warnings[0]


# ---------------------------------------------------------------------------- tiny GPT-2 checkpoints


def _train_sae(acts: torch.Tensor, arch: str, meta: dict[str, Any], seed: int = 0) -> Any:
    """A small sae_lens SAE fitted to ``acts`` [N, d] (Adam on reconstruction, plus an L1
    penalty for the standard architecture), so that it works on the base it was trained on."""
    from sae_lens import SAE

    d_in, d_sae = acts.shape[1], 256
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": meta}
    if arch == "topk":
        cfg["k"] = 8
    torch.manual_seed(seed)
    sae = SAE.from_dict(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        centred = acts - acts.mean(0)
        dirs = centred[torch.randint(0, acts.shape[0], (d_sae,), generator=gen)]
        dirs /= dirs.norm(dim=-1, keepdim=True)
        sae.W_dec.copy_(0.5 * dirs)
        sae.W_enc.copy_(dirs.T.clone())
        sae.b_dec.copy_(acts.mean(0))
        if hasattr(sae, "b_enc"):
            sae.b_enc.fill_(-0.5 if arch == "standard" else 0.0)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    total_var = centred.pow(2).sum(-1).mean()
    norm = acts.norm(dim=-1).mean()
    for _ in range(600 if arch == "standard" else 250):
        batch = acts[torch.randint(0, acts.shape[0], (1024,), generator=gen)]
        feats = sae.encode(batch)
        loss = (batch - sae.decode(feats)).pow(2).sum(-1).mean() / total_var
        if arch == "standard":
            loss = loss + 1.0 * (feats * sae.W_dec.norm(dim=-1)).sum(-1).mean() / norm
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sae.eval()


def _reinitialised(base: Any, tokenizer: Any, seed: int) -> Any:
    """The base with its embeddings and the blocks up to the hook (0 and 1) drawn afresh."""
    import copy

    import hf_tiny

    fresh = hf_tiny.make_model("gpt2", tokenizer, seed=seed, hidden=TINY_HIDDEN, layers=TINY_LAYERS).state_dict()
    model = copy.deepcopy(base)
    state = model.state_dict()
    for key in state:
        if key.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.", "transformer.h.1.")):
            state[key] = fresh[key]
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(workdir: Path) -> dict[str, Any]:
    """A tiny GPT-2 base (3 layers, width 64), its eval text, SAEs trained on it at
    ``blocks.1.hook_resid_post``, and finetunes of it: noisy copies and re-initialised ones."""
    import hf_tiny

    from pytest_sae_transfer.loading import load_model, load_tokens, special_token_ids
    from pytest_sae_transfer.loading.hf import load_tokenizer

    root = workdir / "tiny"
    tok = hf_tiny.make_tokenizer(root / "tok")
    base = hf_tiny.make_model("gpt2", tok, hidden=TINY_HIDDEN, layers=TINY_LAYERS)
    fx: dict[str, Any] = {"root": root, "tokenizer": tok, "model": base}
    fx["base"] = str(hf_tiny.save(base, tok, root / "base"))
    fx["data"] = str(hf_tiny.write_dataset(root / "data.jsonl", n_docs=400, seed=3))

    # The base's activations at the hook, as the plugin sees them (its own loader and packing).
    loaded = load_model(fx["base"], "cpu", "float32")
    tokenizer = load_tokenizer(fx["base"])
    special = special_token_ids(tokenizer)
    tokens = load_tokens(fx["data"], tokenizer, 8192, TINY_CTX, prepend_bos=True, special_token_ids=special).tokens
    with torch.no_grad():
        _, cache = loaded.model.run_with_cache(tokens, names_filter=TINY_HOOK)
    acts = cache[TINY_HOOK][~torch.isin(tokens, torch.tensor(sorted(special)))].float()
    meta = {"hook_name": TINY_HOOK, "context_size": TINY_CTX, "prepend_bos": True, "model_name": fx["base"],
            "dataset_path": fx["data"]}
    for arch in ("standard", "topk"):
        sae = _train_sae(acts, arch, meta)
        sae.save_model(str(root / f"sae_{arch}"))
        fx[f"sae_{arch}"] = str(root / f"sae_{arch}")
    return fx


def _tiny_args(fx: dict[str, Any], arch: str, *finetunes: str, batch: int | None = None) -> list[str]:
    args = ["--sae-path", fx[f"sae_{arch}"], "--base-model", fx["base"], "--sae-dataset", fx["data"],
            "--sae-tokens", TINY_TOKENS, "--sae-thresholds", "default", "--sae-report", "r.json", "--sae-no-cache"]
    if batch is not None:
        args += ["--sae-batch-size", str(batch)]
    for ft in finetunes:
        args += ["--finetune", ft]
    return args


def _finetune_dir(fx: dict[str, Any], kind: str, amount: float, seed: int) -> str:
    """A noisy (``amount`` = relative weight noise) or re-initialised finetune, saved once."""
    import hf_tiny

    name = f"{kind}_{amount:g}_{seed}"
    path = fx["root"] / name
    if not path.exists():
        model = hf_tiny.perturbed(fx["model"], amount, seed=seed) if kind == "noise" else _reinitialised(fx["model"], fx["tokenizer"], seed)
        hf_tiny.save(model, fx["tokenizer"], path)
    return str(path)


def test_tiny_saes_work_on_their_base(tiny: dict[str, Any], workdir: Path) -> None:
    """The trained SAEs are real ones: sparse, without dense features, and reconstructing the
    base's activations (the L1 SAE less well: shrinkage on a random model's activations)."""
    for arch, min_ev in (("standard", 0.4), ("topk", 0.7)):
        run = _run(workdir, *_tiny_args(tiny, arch, tiny["base"]))
        assert run.ret == 0, run.text[-3000:]
        base = run.report()["base"]["metrics"]
        assert base["explained_variance"] > min_ev and base["l0"] < 20 and base["dense_fraction"] < 0.1, (arch, base)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["standard", "topk"]), noise=st.floats(0.002, 0.02), seed=st.integers(1, 50))
def test_small_weight_noise_passes(tiny: dict[str, Any], workdir: Path, arch: str, noise: float, seed: int) -> None:
    ft = _finetune_dir(tiny, "noise", round(noise, 4), seed)
    run = _run(workdir, *_tiny_args(tiny, arch, ft))
    assert run.ret == 0, f"{arch} noise {noise}: {_hard_failures(run.report(), Path(ft).name)}"


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(arch=st.sampled_from(["standard", "topk"]), seed=st.integers(100, 10_000))
def test_reinitialising_the_layers_before_the_hook_fails(tiny: dict[str, Any], workdir: Path, arch: str, seed: int) -> None:
    ft = _finetune_dir(tiny, "reinit", 0, seed)
    run = _run(workdir, *_tiny_args(tiny, arch, ft))
    assert run.ret == 1, run.text[-3000:]
    report = run.report()
    checks = _checks(report, report["finetunes"][0]["model"])
    text = explain_verdict(checks, "base", "reinit")
    # the SAE no longer reconstructs the residual stream it reads, and its features break
    assert "reconstruction" in text.families and "features" in text.families, text.lines


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One noisy and one re-initialised finetune, at the default batch size."""
    fts = [_finetune_dir(tiny, "noise", 0.01, 1), _finetune_dir(tiny, "reinit", 0, 7)]
    run = _run(workdir, *_tiny_args(tiny, "topk", *fts))
    assert run.ret == 1, run.text[-3000:]
    report = run.report()
    assert [f["passed"] for f in report["finetunes"]] == [True, False]
    return {"finetunes": fts, "report": report}


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 16), reverse=st.booleans())
def test_verdict_does_not_depend_on_batch_size_or_finetune_order(
    tiny: dict[str, Any], workdir: Path, reference: dict[str, Any], batch: int, reverse: bool
) -> None:
    fts = list(reversed(reference["finetunes"])) if reverse else reference["finetunes"]
    run = _run(workdir, *_tiny_args(tiny, "topk", *fts, batch=batch))
    assert run.ret == 1
    got = {f["model"]: f for f in run.report()["finetunes"]}
    for ref in reference["report"]["finetunes"]:
        mine = got[ref["model"]]
        assert mine["passed"] == ref["passed"]
        assert [(c["id"], c["passed"], c["severity"]) for c in mine["checks"]] == [
            (c["id"], c["passed"], c["severity"]) for c in ref["checks"]
        ]
        for c_mine, c_ref in zip(mine["checks"], ref["checks"]):
            if c_ref["value"] is not None:
                assert c_mine["value"] == pytest.approx(c_ref["value"], rel=1e-4, abs=1e-6), c_ref["id"]
