"""Tests for the text/HTML renderings (render.py) and the plots (plots.py).

Everything runs on a hand-built, realistic TransferReport: no torch, no models.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pytest_sae_transfer import render
from pytest_sae_transfer.render import outputs as render_outputs
from pytest_sae_transfer.render import plots
from pytest_sae_transfer.render.plots import common as plots_common
from pytest_sae_transfer.report import (
    MODEL_METRIC_KEYS,
    PAIRED_METRIC_KEYS,
    CheckResult,
    FeatureArrays,
    FinetuneResult,
    ModelResult,
    RunReport,
    TransferReport,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D_SAE = 4096
CONTEXT = 128
N_TOKENS = 64 * CONTEXT

BAD = "toy-code"  # transfers badly (the Gemma-like case)
GOOD = "org/toy-math"  # transfers well (the Mistral-like case); a slash in the name on purpose


# --------------------------------------------------------------------------- synthetic report


def _hist(samples: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    counts, _ = np.histogram(samples, bins=edges)
    return {"edges": edges, "counts": counts.astype(np.int64)}


def _model_metrics(rng: np.random.Generator, *, l0: float, ce_clean: float, ce_spliced: float,
                   ev: float, r2: float, dead: float) -> dict[str, object]:
    zero = ce_clean + 6.0
    m: dict[str, object] = {
        "n_tokens": N_TOKENS - 64,
        "l0": l0,
        "ce_loss_clean": ce_clean,
        "ce_loss_spliced": ce_spliced,
        "ce_loss_delta": ce_spliced - ce_clean,
        "ce_loss_zero_ablation": zero,
        "ce_loss_recovered": (zero - ce_spliced) / (zero - ce_clean),
        "kl_div_spliced": float(rng.uniform(0.05, 0.3)),
        "explained_variance": ev,
        "r2_pooled": r2,
        "mse": float(rng.uniform(1, 10)),
        "cossim": float(rng.uniform(0.8, 0.99)),
        "dead_fraction": dead,
        "dense_fraction": 0.0021,
        "outlier_fraction": 0.0,
        "nonfinite_fraction": 0.0,
        "nonfinite_loss_fraction": 0.0,
    }
    assert set(m) == set(MODEL_METRIC_KEYS)
    return m


def _paired(rng: np.random.Generator, *, cos: float, dist: float, r: float, act_sim: float,
            n_regular: int) -> dict[str, object]:
    by_pos_cos: list[float | None] = [None] + [
        float(min(1.0, cos + 0.3 * math.exp(-p / 4) + rng.normal(0, 0.005))) for p in range(1, CONTEXT)
    ]
    by_pos_dist: list[float | None] = [None] + [
        float(dist * (1 - 0.7 * math.exp(-p / 4)) + rng.normal(0, dist * 0.02)) for p in range(1, CONTEXT)
    ]
    p: dict[str, object] = {
        "resid_cosine_mean": cos,
        "resid_cosine_by_position": by_pos_cos,
        "resid_euclidean_mean": dist,
        "resid_euclidean_by_position": by_pos_dist,
        "density_log10_pearson": r,
        "n_dead_base_only": 120,
        "n_dead_finetune_only": 7,
        "dead_shift_fraction": 127 / D_SAE,
        "n_regular_features": n_regular,
        "activation_similarity_mean": act_sim,
        "activation_similarity_median": act_sim + 0.02,
        "activation_similarity_frac_above_0_8": 0.1 if act_sim < 0.8 else 0.93,
        "n_activation_similarity_undefined": 3,
        "logit_similarity_mean": 0.95,
        "logit_similarity_median": 0.97,
        "dead_activation_error_base_only_mean": 0.025,
        "dead_activation_error_finetune_only_mean": None,  # "null when there are none"
        "unembed_frobenius_ratio": 1.117,
        "weight_deviation": [float(x) for x in rng.uniform(0.01, 0.2, size=18)],
    }
    assert set(p) == set(PAIRED_METRIC_KEYS)
    return p


def _vectors(rng: np.random.Generator, base_density: np.ndarray, shift: float) -> dict[str, np.ndarray]:
    n = base_density.size
    logd = np.log10(base_density + 1e-10)
    ft_logd = np.clip(logd + rng.normal(0, shift, n), -7, -0.3)
    ft_density = 10.0 ** ft_logd
    ft_density[rng.random(n) < 0.01] = 0.0  # turned dead
    regular = (logd >= -5) & (logd <= -1) & (ft_logd >= -5) & (ft_logd <= -1) & (ft_density > 0)
    act = np.full(n, np.nan)
    act[regular] = np.clip(rng.normal(1 - shift, 0.15, regular.sum()), -1, 1)
    logit = np.full(n, np.nan)
    logit[regular] = np.clip(rng.normal(0.97, 0.02, regular.sum()), -1, 1)
    dead_err = np.full(n, np.nan)
    one_dead = (base_density == 0) != (ft_density == 0)
    dead_err[one_dead] = rng.gamma(2.0, 0.01, one_dead.sum())
    return {
        "density_base": base_density,
        "density_finetune": ft_density,
        "activation_similarity": act,
        "logit_similarity": logit,
        "dead_activation_error": dead_err,
    }


def make_report(*, with_features: bool = True) -> TransferReport:
    rng = np.random.default_rng(1234)
    config = {
        "sae_release": "toy-sae-res",
        "sae_id": "blocks.1.hook_resid_post",
        "hook_name": "blocks.1.hook_resid_post",
        "base_model": "toy-base",
        "dataset": "toy-zoo/tiny-stories",
        "n_tokens": N_TOKENS,
        "context_size": CONTEXT,
        "device": "cpu",
        "dtype": "float32",
        "seed": 0,
        "versions": {"pytest_sae_transfer": "0.1.0", "sae_lens": "6.54.0"},
    }
    base = ModelResult(
        model="toy-base",
        metrics=_model_metrics(rng, l0=53.6, ce_clean=2.65, ce_spliced=3.16, ev=0.97, r2=0.97, dead=0.481),
        ci95={"l0": [52.9, 54.4], "ce_loss_delta": [0.48, 0.54], "explained_variance": [0.965, 0.975]},
        notes=["finetune vocabulary has 1 extra token (PAD); logit similarity uses the 50257 shared tokens"],
    )
    bad_metrics = _model_metrics(rng, l0=84.7, ce_clean=3.29, ce_spliced=7.5, ev=-10.27, r2=-10.27, dead=0.001)
    bad_metrics["kl_div_spliced"] = None  # a null metric must render as "—"
    bad = FinetuneResult(
        model=BAD,
        metrics=bad_metrics,
        ci95={"l0": [82.0, 87.1], "ce_loss_delta": [4.02, 4.41], "explained_variance": [-11.0, -9.6]},
        notes=["2 contexts had non-finite activations"],
        paired=_paired(rng, cos=0.6691, dist=120.0, r=0.47, act_sim=0.39, n_regular=1800),
        paired_ci95={"resid_cosine_mean": [0.661, 0.676]},
        checks=[
            CheckResult(id="finetune.ce_loss_delta.max", metric="finetune.ce_loss_delta", op="<=", bound=0.5,
                        value=4.21, passed=False, message="spliced CE rose by 4.21 nats; bound 0.5"),
            CheckResult(id="finetune.explained_variance.min", metric="finetune.explained_variance", op=">=",
                        bound=0.5, value=-10.27, passed=False, message="explained variance -10.27 < 0.5"),
            CheckResult(id="finetune.l0.max_ratio_to_base", metric="finetune.l0", op="ratio<=", bound=2.0,
                        value=1.58, passed=True, base_value=53.6),
            CheckResult(id="paired.activation_similarity_mean.min", metric="paired.activation_similarity_mean",
                        op=">=", bound=0.8, value=0.39, passed=False, severity="warn",
                        message="activation similarity 0.39 < 0.8"),
            CheckResult(id="finetune.explained_variance.min_ci_low", metric="finetune.explained_variance",
                        op="ci_low>=", bound=0.45, value=-11.0, passed=False, ci95=(-11.0, -9.6),
                        message="ci95 low -11 < 0.45"),
        ],
    )
    good = FinetuneResult(
        model=GOOD,
        metrics=_model_metrics(rng, l0=55.1, ce_clean=2.70, ce_spliced=3.20, ev=0.96, r2=0.95, dead=0.47),
        ci95={"l0": [54.3, 55.9], "ce_loss_delta": [0.46, 0.53], "explained_variance": [0.955, 0.965]},
        paired=_paired(rng, cos=0.9648, dist=12.0, r=0.94, act_sim=0.958, n_regular=2100),
        paired_ci95={"resid_cosine_mean": [0.963, 0.966]},
        checks=[
            CheckResult(id="finetune.ce_loss_delta.max", metric="finetune.ce_loss_delta", op="<=", bound=0.5,
                        value=0.5, passed=True),
            CheckResult(id="finetune.explained_variance.min", metric="finetune.explained_variance", op=">=",
                        bound=0.5, value=0.96, passed=True),
            CheckResult(id="paired.activation_similarity_mean.min", metric="paired.activation_similarity_mean",
                        op=">=", bound=0.8, value=0.958, passed=True, severity="warn"),
        ],
    )
    report = TransferReport(config=config, base=base, finetunes=[bad, good])
    if not with_features:
        return report

    # Densities: log-normal around 1e-3 with 48% dead in the base (the Gemma-like picture).
    base_density = 10.0 ** np.clip(rng.normal(-3.0, 1.0, D_SAE), -7, -0.2)
    base_density[rng.random(D_SAE) < 0.3] = 0.0
    feats = FeatureArrays()
    feats.vectors[BAD] = _vectors(rng, base_density, shift=0.8)
    feats.vectors[GOOD] = _vectors(rng, base_density, shift=0.05)

    n_tok = N_TOKENS - 64
    act_edges = np.linspace(-6.0, 3.0, 181)
    feats.histograms["base/feature_log10_act"] = _hist(rng.normal(-0.3, 0.5, n_tok * 50), act_edges)
    feats.histograms["base/feature_zero_count"] = {"edges": np.array([]), "counts": np.array([n_tok * D_SAE - n_tok * 50])}
    cos_edges = np.linspace(-1.0, 1.0, 201)
    dist_edges = np.linspace(-2.0, 4.0, 121)
    for ft, cos, dist, trimodal in ((BAD, 0.6691, 120.0, True), (GOOD, 0.9648, 12.0, False)):
        if trimodal:
            acts = np.concatenate([rng.normal(m, 0.3, n_tok * 28) for m in (-2.0, -0.5, 0.8)])
        else:
            acts = rng.normal(-0.28, 0.5, n_tok * 52)
        feats.histograms[f"{ft}/feature_log10_act"] = _hist(acts, act_edges)
        feats.histograms[f"{ft}/feature_zero_count"] = {"edges": np.array([]),
                                                        "counts": np.array([n_tok * D_SAE - acts.size])}
        feats.histograms[f"{ft}/resid_cosine"] = _hist(np.clip(rng.normal(cos, 0.08, n_tok), -1, 1), cos_edges)
        feats.histograms[f"{ft}/resid_euclidean_log10"] = _hist(rng.normal(math.log10(dist), 0.15, n_tok),
                                                                dist_edges)
    report.features = feats
    return report


@pytest.fixture
def report() -> TransferReport:
    return make_report()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> tuple[TransferReport, Path, dict[str, Path], list[Path]]:
    """One full write_report_dir run (plots are the slow part: draw them once per module).

    Returns the report, the folder, the returned paths and every path that went
    through ``atomic_write``.
    """
    rep = make_report()
    out = tmp_path_factory.mktemp("sae-report")
    written: list[Path] = []
    real_atomic = render_outputs.atomic_write

    def spy(path, write, binary=False):  # type: ignore[no-untyped-def]
        written.append(Path(path))
        return real_atomic(path, write, binary=binary)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render_outputs, "atomic_write", spy)
        mp.setattr(plots_common, "atomic_write", spy)
        paths = render.write_report_dir(rep, out, strict=True)
    return rep, out, paths, written


@pytest.fixture(autouse=True)
def _no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI runners set GITHUB_STEP_SUMMARY: never append to the real one from these tests."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


def _tmp_leftovers(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


# --------------------------------------------------------------------------- terminal


def test_fmt_num() -> None:
    assert render.fmt_num(None) == "—"
    assert render.fmt_num(float("nan")) == "—"
    assert render.fmt_num(0.123456) == "0.1235"
    assert render.fmt_num(2.65) == "2.65"
    assert render.fmt_num(-10.2712) == "-10.27"
    assert render.fmt_num(8128) == "8,128"
    assert render.fmt_num(np.int64(8128)) == "8,128"
    assert render.fmt_num(262144.0) == "262,144"
    assert render.fmt_num(1.5e-7) == "1.5e-07"
    assert render.fmt_num(np.float32(0.5)) == "0.5"
    assert render.fmt_num(True) == "true"


def test_terminal_summary_verdicts_and_failures(report: TransferReport) -> None:
    text = render.terminal_summary(report, verbose=True)
    assert f"{BAD}: FAIL (3 of 5 checks failed, 1 warning)" in text
    assert f"{GOOD}: PASS (all 3 checks passed)" in text
    assert "overall: FAIL (1 of 2 finetunes failed)" in text
    # failed checks: id, value and message; the warning with its "!" marker
    for cid, value in (("finetune.ce_loss_delta.max", "4.21"), ("finetune.explained_variance.min", "-10.27"),
                       ("finetune.explained_variance.min_ci_low", "-11")):
        line = next(ln for ln in text.splitlines() if f"✗ {cid}:" in ln)
        assert f"value {value}" in line
    assert "\n        spliced CE rose by 4.21 nats; bound 0.5\n" in text  # message under its check
    assert "! paired.activation_similarity_mean.min [warn]" in text
    assert "✓ finetune.l0.max_ratio_to_base" in text
    # the title names the SAE and the models; notes are listed
    first = text.splitlines()[0]
    assert "toy-sae-res/blocks.1.hook_resid_post" in first and "toy-base" in first and BAD in first
    assert "vocabulary has 1 extra token" in text
    assert "2 contexts had non-finite activations" in text
    # every main metric, base and finetune columns, 4 significant digits, nulls as "—"
    for key in render.MAIN_METRICS:
        assert key in text
    ce_line = next(ln for ln in text.splitlines() if ln.strip().startswith("ce_loss_clean"))
    assert "2.65" in ce_line and "3.29" in ce_line
    kl_line = next(ln for ln in text.splitlines() if ln.strip().startswith("kl_div_spliced"))
    assert "—" in kl_line
    l0_line = next(ln for ln in text.splitlines() if ln.strip().startswith("l0 "))
    assert "[82, 87.1]" in l0_line and "+31.1" in l0_line
    ev_line = next(ln for ln in text.splitlines() if ln.strip().startswith("explained_variance"))
    assert ev_line.rstrip().endswith("✗")
    # paired scalars; per-position lines stay out of the table
    assert "resid_cosine_mean" in text and "0.6691" in text and "[0.661, 0.676]" in text
    assert "resid_cosine_by_position" not in text
    assert "weight_deviation" in text and "18 values" in text
    assert all(len(ln) <= 100 for ln in text.splitlines()), max(text.splitlines(), key=len)


def test_terminal_summary_width_and_ascii(report: TransferReport) -> None:
    narrow = render.terminal_summary(report, width=60, verbose=True)
    for ln in narrow.splitlines():
        if "checks:" in ln or ln.startswith("    "):
            assert len(ln) <= 60, ln
    plain = render.terminal_summary(report, ascii_only=True, verbose=True)
    plain.encode("ascii")
    assert f"{BAD}: FAIL (3 of 5 checks failed, 1 warning)" in plain
    assert "x finetune.ce_loss_delta.max:" in plain


def test_default_summary_fits_on_a_screen(report: TransferReport) -> None:
    """Without -v: per finetune the verdict with its reason, each failing check once on one
    line (never wrapped mid-expression), warnings apart, and a count of the passing ones."""
    text = render.terminal_summary(report)
    lines = text.splitlines()
    assert len(lines) <= 25, text
    assert f"── {BAD}: FAIL" in text and f"── {GOOD}: PASS" in text
    assert any(ln.strip().startswith("FAIL: on toy-code the SAE") for ln in lines), text
    failed = [c for c in report.finetune(BAD).checks if not c.passed and c.severity == "fail"]
    for c in failed:
        mine = [ln for ln in lines if f"✗ {c.id}:" in ln]
        assert len(mine) == 1 and c.message in mine[0], (c.id, mine)
    assert not any("✓" in ln for ln in lines)  # passing checks are counted, not listed
    assert "1 of 5 checks passed" in text and "3 of 3 checks passed" in text
    assert "overall: FAIL (1 of 2 finetunes failed)" in text


def test_verdict_without_checks() -> None:
    rep = make_report(with_features=False)
    for ft in rep.finetunes:
        ft.checks = []
    text = render.terminal_summary(rep)
    assert f"{BAD}: NO CHECKS" in text
    assert "overall: NO CHECKS" in text
    md = render.markdown_summary(rep)
    assert "NO CHECKS" in md


def test_all_passing_report() -> None:
    rep = make_report(with_features=False)
    rep.finetunes = [rep.finetunes[1]]
    text = render.terminal_summary(rep)
    assert "overall: PASS (all 1 finetune passed)" in text
    assert "✗" not in text
    assert "SAE transfer: PASS" in render.markdown_summary(rep)


def test_family_counts_only_the_judged_saes() -> None:
    """With -k keeping one SAE's checks, the others are measured but not judged: the family
    summary says so and counts its verdict over the judged SAEs only."""
    judged = make_report(with_features=False)
    judged.config = {**judged.config, "sae_key": "blocks.1.hook_resid_post"}
    left_out = make_report(with_features=False)
    left_out.config = {**left_out.config, "sae_key": "blocks.2.hook_resid_post", "hook_name": "blocks.2.hook_resid_post"}
    for ft in left_out.finetunes:
        ft.deselected = [c.id for c in ft.checks]
        ft.checks = []
    run = RunReport([judged, left_out])
    n_failed_fts = sum(1 for ft in judged.finetunes if ft.passed is False)
    text = render.terminal_summary(run)
    assert "DESELECTED" in text
    assert (f"overall: FAIL ({n_failed_fts} of {len(judged.finetunes)} judged (finetune, SAE) pairs failed; "
            f"{len(left_out.finetunes)} measured but deselected)") in text
    assert f"{BAD}: FAIL (1 of 1 SAEs failed; 1 deselected)" in text
    assert "DESELECTED" in render.markdown_summary(run)


# --------------------------------------------------------------------------- markdown


def test_markdown_summary(report: TransferReport) -> None:
    md = render.markdown_summary(report)
    first = md.splitlines()[0]
    assert first.startswith("## ") and "SAE transfer: FAIL" in first and "1 of 2 finetunes failed" in first
    assert "| metric | base | base ci95 | finetune | finetune ci95 | Δ (ft − base) |" in md
    assert "| --- | ---: |" in md
    assert f"### ❌ {BAD}: FAIL (3 of 5 checks failed, 1 warning)" in md
    assert f"### ✅ {GOOD}: PASS (all 3 checks passed)" in md
    assert "`finetune.ce_loss_delta.max`" in md and "spliced CE rose by 4.21 nats" in md
    assert "**Paired metrics (base vs finetune)**" in md
    assert "<details><summary>Run configuration</summary>" in md
    assert "`versions.sae_lens`" in md
    # tables are well formed: every table row has the header's column count
    lines = md.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith("| ---") or ln.startswith("| :---:"):
            n = lines[i - 1].count(" | ")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count(" | ") == n, lines[j]
                j += 1


def test_markdown_escapes_pipes() -> None:
    rep = make_report(with_features=False)
    rep.finetunes[0].checks = [CheckResult(id="x", metric="finetune.l0", op="<=", bound=1.0, value=2.0,
                                           passed=False, message="a | b")]
    md = render.markdown_summary(rep)
    assert "a \\| b" in md


def test_github_step_summary_appends(report: TransferReport, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "step_summary.md"
    target.write_text("# earlier step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    assert render.append_github_step_summary(report) is True
    assert render.append_github_step_summary(report) is True
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# earlier step\n")
    assert text.count("SAE transfer: FAIL") == 2


def test_github_step_summary_unset_does_nothing(report: TransferReport, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    assert render.append_github_step_summary(report) is False
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "")
    assert render.append_github_step_summary(report) is False
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- HTML


def test_html_page_self_contained(drawn) -> None:  # type: ignore[no-untyped-def]
    report, _, paths, _ = drawn
    made = {k: v for k, v in paths.items() if k not in ("summary.md", "report.html")}
    page = render.html_page(report, {k: str(v) for k, v in made.items()})
    assert page == paths["report.html"].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>SAE transfer: toy-sae-res/blocks.1.hook_resid_post — toy-base → " in page
    lowered = page.lower()
    assert 'src="http' not in lowered and "src='http" not in lowered
    assert "<link" not in lowered and "@import" not in lowered and "url(" not in lowered
    assert "<script" not in lowered
    assert page.count('src="data:image/png;base64,') == len(made) == 2 * len(plots.FINETUNE_PLOTS)
    for name in made:
        assert f'data-plot="{name}"' in page
    assert "finetune.ce_loss_delta.max" in page and "spliced CE rose by 4.21 nats" in page
    assert page.count('class="badge FAIL"') >= 2  # headline + the failing finetune
    assert 'class="badge PASS"' in page
    assert "vocabulary has 1 extra token" in page


def test_html_page_escapes_and_handles_missing_files(tmp_path: Path) -> None:
    rep = make_report(with_features=False)
    rep.finetunes[0].notes = ["<script>alert(1)</script>"]
    page = render.html_page(rep, {f"{BAD}/density_hist": str(tmp_path / "nope.png"),
                                  "extra/thing": str(tmp_path / "nope2.png")})
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "image file missing" in page
    assert "Other plots" in page


# --------------------------------------------------------------------------- report directory and plots


def test_write_report_dir(drawn) -> None:  # type: ignore[no-untyped-def]
    _, out, paths, written = drawn
    assert paths["summary.md"] == out / "summary.md"
    assert paths["report.html"] == out / "report.html"
    pngs = {k: v for k, v in paths.items() if k not in ("summary.md", "report.html")}
    assert set(pngs) == {f"{ft}/{kind}" for ft in (BAD, GOOD) for kind in plots.FINETUNE_PLOTS}
    for p in paths.values():
        assert p.is_file() and p.parent == out
    assert sorted(written) == sorted(paths.values())  # every file went through atomic_write
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    for p in pngs.values():
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC, p
        assert 10_000 < len(data) < 1_500_000, (p, len(data))
        assert p.suffix == ".png"
    assert not _tmp_leftovers(out)
    assert "SAE transfer: FAIL" in paths["summary.md"].read_text(encoding="utf-8")
    page = paths["report.html"].read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == len(pngs)
    # slugged file names: the slash in "org/toy-math" does not create a folder
    assert paths[f"{GOOD}/density_hist"] == out / "org_toy-math__density_hist.png"


def test_png_is_readable_image(drawn) -> None:  # type: ignore[no-untyped-def]
    import matplotlib.image as mpimg

    _, _, paths, _ = drawn
    img = mpimg.imread(paths[f"{BAD}/density_hist"])
    h, w = img.shape[:2]
    assert 400 <= h <= 1200 and 600 <= w <= 1600


def test_failed_write_leaves_old_files_and_no_temp(report: TransferReport, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    victim = plots.plot_density_hist(report, BAD, out / f"{BAD}__density_hist.png")
    assert victim is not None
    before = victim.read_bytes()

    from matplotlib.figure import Figure

    def broken_savefig(self, fh, *a, **k):  # type: ignore[no-untyped-def]
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_density_hist(report, BAD, victim)
    assert victim.read_bytes() == before
    assert not _tmp_leftovers(out)
    # non-strict: plots are skipped with a warning, text reports still written
    with pytest.warns(RuntimeWarning, match="disk full"):
        paths2 = render.write_report_dir(report, out, strict=False)
    assert set(paths2) == {"summary.md", "report.html"}
    assert victim.read_bytes() == before
    assert not _tmp_leftovers(out)


def test_plots_skip_without_features(tmp_path: Path) -> None:
    rep = make_report(with_features=False)
    for kind, fn in plots.FINETUNE_PLOTS.items():
        got = fn(rep, BAD, tmp_path / f"{kind}.png")
        if kind in ("resid_cosine_by_position", "resid_euclidean_by_position", "weight_deviation"):
            assert got is not None and got.is_file(), kind  # these come from the JSON, not the sidecar
        else:
            assert got is None, kind
            assert not (tmp_path / f"{kind}.png").exists()
    # no paired lines either: nothing at all, no error
    for ft in rep.finetunes:
        ft.paired = {}
    assert plots.make_all_plots(rep, tmp_path / "empty") == {}
    # and the HTML still renders
    assert "<table>" in render.html_page(rep, {})
    # an unknown finetune name
    assert plots.plot_resid_cosine_by_position(rep, "no-such-model", tmp_path / "x.png") is None


def test_plots_skip_on_partial_or_bad_data(report: TransferReport, tmp_path: Path) -> None:
    feats = report.features
    assert feats is not None
    # malformed histogram (edges/counts length mismatch) and an empty one
    feats.histograms[f"{BAD}/resid_cosine"] = {"edges": np.linspace(-1, 1, 5), "counts": np.ones(7)}
    feats.histograms[f"{BAD}/resid_euclidean_log10"] = {"edges": np.linspace(0, 1, 5), "counts": np.zeros(4)}
    assert plots.plot_resid_cosine_hist(report, BAD, tmp_path / "a.png") is None
    assert plots.plot_resid_euclidean_hist(report, BAD, tmp_path / "b.png") is None
    # all-NaN similarity: nothing to draw
    feats.vectors[BAD]["activation_similarity"] = np.full(D_SAE, np.nan)
    assert plots.plot_activation_similarity_hist(report, BAD, tmp_path / "c.png") is None
    # per-position line that is all null
    report.finetune(BAD).paired["resid_cosine_by_position"] = [None] * CONTEXT
    assert plots.plot_resid_cosine_by_position(report, BAD, tmp_path / "d.png") is None
    # only the finetune's activation histogram (base missing): still drawn
    del feats.histograms["base/feature_log10_act"]
    assert plots.plot_feature_activation_hist(report, BAD, tmp_path / "e.png") is not None
    # only one density vector: histogram drawn, scatter skipped
    del feats.vectors[GOOD]["density_finetune"]
    assert plots.plot_density_hist(report, GOOD, tmp_path / "f.png") is not None
    assert plots.plot_density_scatter(report, GOOD, tmp_path / "g.png") is None
    report.finetunes = [report.finetune(BAD)]  # one finetune keeps this test quick
    made = plots.make_all_plots(report, tmp_path / "all")
    skipped = {"resid_cosine_hist", "resid_euclidean_hist", "activation_similarity_hist", "resid_cosine_by_position"}
    assert set(made) == {f"{BAD}/{kind}" for kind in plots.FINETUNE_PLOTS if kind not in skipped}


def test_no_pyplot_state_leaks(drawn) -> None:  # type: ignore[no-untyped-def]
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_render_import_is_light() -> None:
    # render/plots must not pull in matplotlib or torch themselves (whatever the package __init__ does)
    code = (
        "import sys, pytest_sae_transfer, pytest_sae_transfer.report;"
        "before = {m for m in ('matplotlib', 'torch') if m in sys.modules};"
        "import pytest_sae_transfer.render, pytest_sae_transfer.render.plots;"
        "new = {m for m in ('matplotlib', 'torch') if m in sys.modules} - before;"
        "assert not new, new"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


def test_finetune_slugs_unique() -> None:
    rep = make_report(with_features=False)
    rep.finetunes.append(FinetuneResult(model="org_toy-math", metrics={}))
    slugs = plots.finetune_slugs(rep)
    assert len(set(slugs.values())) == 3
    assert all("/" not in s for s in slugs.values())


# --------------------------------------------------------------------------- JSON round trip


def test_json_round_trip_keeps_features_and_plots(report: TransferReport, tmp_path: Path) -> None:
    path = report.write_json(tmp_path / "sae_transfer.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["features_file"] == "sae_transfer.features.npz"
    assert (tmp_path / data["features_file"]).is_file()

    again = TransferReport.read_json(path)
    assert again.features is not None
    for ft in (BAD, GOOD):
        for key, arr in report.features.vectors[ft].items():  # type: ignore[union-attr]
            np.testing.assert_array_equal(again.features.vectors[ft][key], arr)
    for name, hist in report.features.histograms.items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(again.features.histograms[name]["counts"], hist["counts"])
        np.testing.assert_array_equal(again.features.histograms[name]["edges"], hist["edges"])

    # the text renderings agree, and the same plots can be drawn from the re-read report
    assert render.terminal_summary(again) == render.terminal_summary(report)
    assert render.markdown_summary(again) == render.markdown_summary(report)
    made_again = plots.make_all_plots(again, tmp_path / "again")
    assert set(made_again) == {f"{ft}/{kind}" for ft in (BAD, GOOD) for kind in plots.FINETUNE_PLOTS}
    for p in made_again.values():
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_round_trip_without_sidecar_still_renders(report: TransferReport, tmp_path: Path) -> None:
    path = report.write_json(tmp_path / "r.json")
    (tmp_path / "r.features.npz").unlink()
    again = TransferReport.read_json(path)
    assert again.features is None
    paths = render.write_report_dir(again, tmp_path / "out", strict=True)
    kinds = {k.rsplit("/", 1)[1] for k in paths if "/" in k}
    assert kinds == {"resid_cosine_by_position", "resid_euclidean_by_position", "weight_deviation"}


def test_atomic_write_removes_stale_temporaries_of_a_killed_writer(tmp_path: Path) -> None:
    """A writer killed mid-write leaves a hidden ``.r.json.*.tmp``; the next write of
    r.json removes it once it is over an hour old, and leaves a fresh one (a live writer) alone."""
    from pytest_sae_transfer.report import STALE_TEMP_AGE_S, atomic_write

    stale = tmp_path / ".r.json.abc123.tmp"
    live = tmp_path / ".r.json.def456.tmp"
    other = tmp_path / ".other.json.abc123.tmp"  # another file's temporary: not ours to judge
    for p in (stale, live, other):
        p.write_text("{partial", encoding="utf-8")
    old = os.path.getmtime(stale) - STALE_TEMP_AGE_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))

    atomic_write(tmp_path / "r.json", lambda fh: fh.write("{}"))

    assert (tmp_path / "r.json").read_text(encoding="utf-8") == "{}"
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_plots_drawn_from_the_same_numbers_are_kept(report: TransferReport, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A re-run with the same numbers (a threshold edit) redraws nothing; changed numbers redraw."""
    first = plots.make_all_plots(report, tmp_path)
    assert first
    from matplotlib.figure import Figure

    calls = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    report.finetune(BAD).checks = []  # checks do not enter the pictures
    assert plots.make_all_plots(report, tmp_path) == first and calls == []
    report.finetune(BAD).paired["resid_cosine_mean"] = 0.123  # the numbers do
    again = plots.make_all_plots(report, tmp_path)
    assert set(again) == set(first)
    assert len(calls) == sum(1 for name in first if name.startswith(f"{BAD}/"))
