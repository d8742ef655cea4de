"""Words and numbers every rendering shares: number formats, check symbols, verdicts,
the report's title and facts, and which metrics to show."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping, Sequence

from ..report import MODEL_METRIC_KEYS, PAIRED_METRIC_KEYS, CheckResult, FinetuneResult, TransferReport

#: Per-model metrics the terminal table always shows, in this order.
MAIN_METRICS: tuple[str, ...] = (
    "l0",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_delta",
    "ce_loss_recovered",
    "kl_div_spliced",
    "explained_variance",
    "r2_pooled",
    "dead_fraction",
    "dense_fraction",
    "nonfinite_fraction",
)


#: Paired keys holding per-position lines: drawn as plots, not put in tables.
LINE_KEYS = ("resid_cosine_by_position", "resid_euclidean_by_position")


def is_number(v: Any) -> bool:
    """Real numbers, numpy scalars included; bools are not numbers here."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def fmt_num(v: Any, digits: int = 4) -> str:
    """4 significant digits; ints (and integral floats ≥ 1000) with thousands separators; null as "—"."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if is_number(v):
        if isinstance(v, int) or type(v).__name__.startswith(("int", "uint")):
            return f"{int(v):,}"
        f = float(v)
        if math.isnan(f):
            return "—"
        if math.isinf(f):
            return "∞" if f > 0 else "−∞"
        if f.is_integer() and 1000 <= abs(f) < 1e15:
            return f"{int(f):,}"
        return f"{f:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return fmt_list(v)
    return str(v)


def finite(v: Any) -> float | None:
    if not is_number(v):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def fmt_delta(base: Any, ft: Any, key: str = "") -> str:
    if key == "n_tokens":  # the same tokens feed both models; a difference is not a change
        return ""
    b, f = finite(base), finite(ft)
    if b is None or f is None:
        return ""
    return f"{f - b:+.4g}"


def fmt_ci(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def fmt_list(values: Sequence[Any]) -> str:
    vals = [finite(v) for v in values]
    good = [(i, v) for i, v in enumerate(vals) if v is not None]
    if not good:
        return f"{len(values)} values, all null"
    i_max, v_max = max(good, key=lambda t: t[1])
    mean = sum(v for _, v in good) / len(good)
    return f"{len(values)} values: mean {fmt_num(mean)}, max {fmt_num(v_max)} (#{i_max})"


def fmt_paired(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        vals = list(value.values())
        if vals and all(is_number(v) or v is None for v in vals):
            keys = list(value.keys())
            good = [(k, finite(v)) for k, v in zip(keys, vals) if finite(v) is not None]
            if good:
                k_max, v_max = max(good, key=lambda t: t[1])
                return f"{len(vals)} values: max {fmt_num(v_max)} ({k_max})"
        return f"{len(value)} entries"
    if key == "weight_deviation" and isinstance(value, (list, tuple)):
        return fmt_list(value).replace("(#", "(block ")
    return fmt_num(value)


def check_symbol(c: CheckResult) -> str:
    """✓ passed, ✗ failed (fail severity), ! failed warning."""
    if c.passed:
        return "✓"
    return "✗" if c.severity == "fail" else "!"


def check_expr(c: CheckResult) -> str:
    return f"{c.metric} {c.op} {fmt_num(c.bound)}"


def check_value(c: CheckResult) -> str:
    out = f"value {fmt_num(c.value)}"
    if c.base_value is not None:
        out += f", base {fmt_num(c.base_value)}"
    if c.ci95 is not None:
        # A relative check holds the paired interval of the difference or ratio it checks.
        label = "paired ci95" if c.op.startswith(("increase", "decrease", "ratio")) else "ci95"
        out += f", {label} {fmt_ci(list(c.ci95))}"
    return out


def sorted_checks(checks: Iterable[CheckResult]) -> list[CheckResult]:
    """Failures first, then failed warnings, then passes; stable otherwise."""
    rank = {"✗": 0, "!": 1, "✓": 2}
    return sorted(checks, key=lambda c: rank[check_symbol(c)])


def finetune_verdict(ft: FinetuneResult) -> tuple[str, str]:
    """``("FAIL", "3 of 12 checks failed")``, ``("PASS", "all 12 checks passed")``, ``("NO CHECKS", ...)``."""
    checks = list(ft.checks)
    if not checks and ft.deselected:
        n = len(ft.deselected)
        return "DESELECTED", f"measured, not judged: its {n} check{'s' if n != 1 else ''} deselected (-k/-m)"
    if not checks:
        return "NO CHECKS", "no thresholds were checked"
    n = len(checks)
    fails = sum(1 for c in checks if not c.passed and c.severity == "fail")
    warns = sum(1 for c in checks if not c.passed and c.severity != "fail")
    warn_txt = f", {warns} warning{'s' if warns != 1 else ''}" if warns else ""
    if ft.passed is False:
        return "FAIL", f"{fails} of {n} check{'s' if n != 1 else ''} failed{warn_txt}"
    if warns:
        return "PASS", f"{n - warns} of {n} checks passed{warn_txt}"
    return "PASS", f"all {n} check{'s' if n != 1 else ''} passed"


def overall_verdict(report: TransferReport) -> tuple[str, str]:
    verdicts = [finetune_verdict(ft)[0] for ft in report.finetunes]
    n = len(verdicts)
    n_fail = verdicts.count("FAIL")
    if not n:
        return "NO FINETUNES", "the report holds no finetunes"
    if report.passed is None:
        return "NO CHECKS", f"{n} finetune{'s' if n != 1 else ''} measured, no thresholds checked"
    if n_fail:
        return "FAIL", f"{n_fail} of {n} finetune{'s' if n != 1 else ''} failed"
    return "PASS", f"all {n} finetune{'s' if n != 1 else ''} passed"


def cfg_get(config: Mapping[str, Any], *keys: str) -> Any:
    """First non-empty value among ``keys``, also looking one level into ``config["sae"]``/``["base"]``."""
    for k in keys:
        v = config.get(k)
        if v not in (None, ""):
            return v
    for nest in ("sae", "run", "base"):
        sub = config.get(nest)
        if isinstance(sub, Mapping):
            for k in keys:
                short = k.split("_", 1)[1] if k.startswith(nest + "_") else k
                for kk in (k, short):
                    v = sub.get(kk)
                    if v not in (None, ""):
                        return v
    return None


def sae_label(config: Mapping[str, Any]) -> str:
    release = cfg_get(config, "sae_release", "release")
    sae_id = cfg_get(config, "sae_id")
    path = cfg_get(config, "sae_path", "path")
    if release and sae_id:
        return f"{release}/{sae_id}"
    if release or sae_id:
        return str(release or sae_id)
    if path:
        return str(path)
    sae = config.get("sae")
    return str(sae) if isinstance(sae, str) and sae else "SAE"


def report_title(report: TransferReport) -> str:
    """``SAE transfer: <release>/<id> @ <hook> — <base> → <ft1>, <ft2>``."""
    cfg = report.config
    hook = cfg_get(cfg, "hook_name")
    sae = sae_label(cfg)
    where = f" @ {hook}" if hook and str(hook) not in sae else ""
    fts = ", ".join(ft.model for ft in report.finetunes) or "(no finetunes)"
    return f"SAE transfer: {sae}{where} — {report.base.model} → {fts}"


def run_facts(report: TransferReport) -> list[tuple[str, str]]:
    cfg = report.config
    facts: list[tuple[str, str]] = [("base", report.base.model)]
    dataset = cfg_get(cfg, "dataset", "dataset_path", "dataset_name")
    if dataset:
        facts.append(("dataset", str(dataset)))
    n_tok = report.base.metrics.get("n_tokens", cfg_get(cfg, "n_tokens"))
    if n_tok is not None:
        facts.append(("tokens", fmt_num(n_tok)))
    ctx = cfg_get(cfg, "context_size")
    if ctx is not None:
        facts.append(("context", fmt_num(ctx)))
    for key in ("device", "dtype"):
        v = cfg_get(cfg, key)
        if v:
            facts.append((key, str(v)))
    return facts


def metric_keys(report: TransferReport, ft: FinetuneResult, full: bool) -> list[str]:
    present = set(report.base.metrics) | set(ft.metrics)
    checked = {c.metric.split(".", 1)[1] for c in ft.checks if c.metric.split(".", 1)[0] in ("base", "finetune")
               and "." in c.metric}
    if full:
        keys = [k for k in MODEL_METRIC_KEYS if k in present]
        keys += sorted(k for k in present if k not in MODEL_METRIC_KEYS)
    else:
        keys = [k for k in MAIN_METRICS if k in present]
        keys += [k for k in MODEL_METRIC_KEYS if k in checked and k in present and k not in keys]
        keys += sorted(k for k in checked if k in present and k not in keys)
    return keys


def paired_keys(ft: FinetuneResult) -> list[str]:
    keys = [k for k in PAIRED_METRIC_KEYS if k in ft.paired]
    keys += sorted(k for k in ft.paired if k not in PAIRED_METRIC_KEYS)
    return [k for k in keys if k not in LINE_KEYS]


def check_marker(ft: FinetuneResult, metric_names: Sequence[str]) -> str:
    """Worst check symbol among checks on any of ``metric_names`` (``"finetune.l0"``...)."""
    syms = {check_symbol(c) for c in ft.checks if c.metric in metric_names}
    for s in ("✗", "!", "✓"):
        if s in syms:
            return s
    return ""


def all_notes(report: TransferReport) -> list[str]:
    notes = list(report.base.notes)
    cfg_notes = report.config.get("notes")
    if isinstance(cfg_notes, (list, tuple)):
        notes += [str(n) for n in cfg_notes]
    elif isinstance(cfg_notes, str) and cfg_notes:
        notes.append(cfg_notes)
    seen: set[str] = set()
    return [n for n in notes if not (n in seen or seen.add(n))]


def flat_config(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += flat_config(v, key + ".")
        else:
            out.append((key, v))
    return out


def cfg_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        s = ", ".join(fmt_num(x) if is_number(x) else str(x) for x in v)
        return s if len(s) <= 200 else s[:199] + "…"
    s = fmt_num(v) if not isinstance(v, str) else v
    return s if len(s) <= 200 else s[:199] + "…"

