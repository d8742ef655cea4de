"""Feature watchlists: features a release owner pins, each with bounds that must hold.

Why: a mean over thousands of features can pass while the few features a safety
tool depends on ("deception", "refusal") broke, or fail while they survived. A
watchlist turns chosen features into gate items of their own, each failing with its
value, its bound and the feature's density on both models.

In a profile::

    [features]
    ids = [12, 40]                 # watched with the default bounds
    file = "watched.txt"           # one id per line, optional label after it ('#' lines skipped)
    min_firings = 10               # fewer firings on either model: similarity cannot be judged
    severity = "fail"              # for watched features that do not set their own

    [features.defaults]            # bounds of every watched feature without bounds of its own
    min_activation_similarity = 0.8
    must_stay_alive = true

    [features.311]                 # a feature with a label and bounds of its own
    label = "def keyword"
    min_activation_similarity = 0.9
    max_density_ratio = 4          # density on the finetune / density on the base
    min_density_ratio = 0.25

Bounds (``WATCH_BOUNDS``): ``min_activation_similarity``, ``min_logit_similarity``
(each in [-1, 1]), ``max_density_ratio`` and ``min_density_ratio`` (positive),
``must_stay_alive`` (true or false). A feature's own bounds replace the defaults as
a whole, as a profile's own check table replaces an inherited one.

Inheritance (``extends``): the parent's watched features are kept; a child's
``[features.<id>]`` table replaces the parent's entry for that id
(``enabled = false`` drops it), a child's ``ids``/``file`` add ids (an id already
watched keeps its entry), ``[features.defaults]`` replaces the parent's defaults as a
whole, and ``min_firings``/``severity`` override. Ids from the command line are added
by :func:`add_watch_ids`.

Never a silent pass. A watched feature dead on the base, one that fired fewer than
``min_firings`` times on either model (for its similarity bounds), or one whose
similarity the run did not record (only regular features have one) gives a failing
"cannot judge" result that says why. A watched id outside ``[0, d_sae)``, a watched
feature with no bounds at all, and every bad key or value are usage errors
(:class:`ProfileError`) that name the file (or option) and the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .sources import Source, is_number, suggest, type_name
from .vocabulary import SEVERITIES, ProfileError

#: Bound key -> (quantity, op) of the CheckResult it produces, in evaluation order.
WATCH_BOUNDS: Mapping[str, tuple[str, str]] = types.MappingProxyType(
    {
        "min_activation_similarity": ("activation_similarity", ">="),
        "min_logit_similarity": ("logit_similarity", ">="),
        "max_density_ratio": ("density_ratio", "<="),
        "min_density_ratio": ("density_ratio", ">="),
        "must_stay_alive": ("stays_alive", "alive"),
    }
)

#: Keys of ``[features]`` other than per-feature tables.
FEATURES_KEYS: tuple[str, ...] = ("ids", "file", "min_firings", "severity", "defaults")

#: Keys of a ``[features.<id>]`` table besides bounds.
FEATURE_OPTION_KEYS: tuple[str, ...] = ("label", "severity", "enabled")

#: Below this many firings on either model a feature's similarity is not judged.
DEFAULT_MIN_FIRINGS = 10

_SIMILARITY_BOUNDS = ("min_activation_similarity", "min_logit_similarity")
_LABEL_MAX = 80


@dataclasses.dataclass(frozen=True)
class WatchedFeature:
    """One watched feature. ``bounds`` None: the watchlist's defaults apply."""

    id: int
    label: str | None = None
    bounds: tuple[tuple[str, Any], ...] | None = None
    severity: str | None = None
    source: str = ""  # where it was named: a profile key, "file.txt:3" or "--sae-features"


@dataclasses.dataclass(frozen=True)
class Watchlist:
    """The resolved ``[features]`` of a profile (with what it extends), plus any ids added later."""

    features: tuple[WatchedFeature, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    defaults_source: str = ""
    min_firings: int = DEFAULT_MIN_FIRINGS
    severity: str = "fail"

    def feature(self, feature_id: int) -> WatchedFeature | None:
        for f in self.features:
            if f.id == feature_id:
                return f
        return None

    @property
    def ids(self) -> list[int]:
        return [f.id for f in self.features]

    def resolved(self) -> list[tuple[WatchedFeature, tuple[tuple[str, Any], ...], str]]:
        """(feature, its bounds, its severity) for every watched feature.

        Raises :class:`ProfileError` for a feature that has no bounds of its own when
        there are no defaults either: it would be watched without being checked.
        """
        out = []
        for f in self.features:
            bounds = f.bounds if f.bounds is not None else self.defaults
            if not any(_is_checked(k, v) for k, v in bounds):
                where = f.source or "the watchlist"
                raise ProfileError(
                    f"{where}: watched feature {f.id} has no bounds and the profile sets no [features.defaults]; "
                    f"add bounds in [features.{f.id}] (e.g. min_activation_similarity = 0.8) or a "
                    "[features.defaults] table"
                )
            out.append((f, bounds, f.severity or self.severity))
        return out

    def labels(self) -> list[tuple[int, str | None]]:
        """(id, label) pairs, for the report's ``"watched"`` list."""
        return [(f.id, f.label) for f in self.features]


def _is_checked(key: str, value: Any) -> bool:
    return not (key == "must_stay_alive" and value is False)


# ---------------------------------------------------------------------------- parsing


def _feature_id(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            raise ProfileError(f"{where}: feature id must be an integer, got {value!r}; write {int(value)}")
        raise ProfileError(f"{where}: feature id must be a non-negative integer, got {type_name(value)}")
    if value < 0:
        raise ProfileError(f"{where}: feature id must be a non-negative integer, got {value}")
    return int(value)


def check_label(label: Any, where: str) -> str:
    """A label is shown in gate item ids, so it must be short, printable and free of '::'."""
    if not isinstance(label, str):
        raise ProfileError(f"{where}: label must be a string, got {type_name(label)}")
    text = label.strip()
    if not text:
        raise ProfileError(f"{where}: label is empty; leave it out, or name what the feature is about")
    if len(text) > _LABEL_MAX:
        raise ProfileError(f"{where}: label is {len(text)} characters long; keep it to {_LABEL_MAX}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ProfileError(f"{where}: label {text!r} holds a control character (line break, tab, ...)")
    if "::" in text:
        raise ProfileError(f"{where}: label {text!r} holds '::', which separates parts of pytest item ids")
    return text


def _severity(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in SEVERITIES:
        shown = repr(value) if isinstance(value, str) else type_name(value)
        raise ProfileError(
            f"{where}: severity must be \"fail\" or \"warn\", got {shown}; " + suggest(str(value).lower(), SEVERITIES)
        )
    return value


def _bound(key: str, value: Any, where: str) -> Any:
    if key == "must_stay_alive":
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: must be true or false, got {type_name(value)}")
        return value
    if not is_number(value):
        raise ProfileError(f"{where}: bound must be a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise ProfileError(f"{where}: bound must be finite, got {value!r}")
    value = float(value)
    if key in _SIMILARITY_BOUNDS and not -1.0 <= value <= 1.0:
        raise ProfileError(f"{where}: a similarity is a correlation in [-1, 1], so {value!r} could never be met as intended")
    if key.endswith("density_ratio") and value <= 0:
        raise ProfileError(f"{where}: a density ratio bound must be positive, got {value!r}")
    return value


def _bounds_table(table: Mapping[str, Any], where: str, allowed_extra: Sequence[str]) -> tuple[tuple[tuple[str, Any], ...], dict[str, Any]]:
    """(bounds in WATCH_BOUNDS order, the other keys) of a table; unknown keys are errors."""
    found: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in table.items():
        kwhere = f"{where} key '{key}'"
        if key in WATCH_BOUNDS:
            found[key] = _bound(key, value, kwhere)
        elif key in allowed_extra:
            extra[key] = value
        else:
            raise ProfileError(f"{kwhere}: unknown feature bound; " + suggest(key, tuple(WATCH_BOUNDS) + tuple(allowed_extra)))
    lo, hi = found.get("min_density_ratio"), found.get("max_density_ratio")
    if lo is not None and hi is not None and lo > hi:
        raise ProfileError(f"{where} key 'min_density_ratio': {lo!r} > max_density_ratio {hi!r}, the check can never pass")
    return tuple((k, found[k]) for k in WATCH_BOUNDS if k in found), extra


def read_ids_file(path: Any, display: str) -> list[tuple[int, str | None, str]]:
    """(id, label or None, "file:line") per line of a watch file: ``<id> [label]``;
    blank lines and lines starting with '#' are skipped."""
    try:
        data = path.read_bytes()
    except (OSError, FileNotFoundError) as exc:
        raise ProfileError(f"{display}: cannot read the feature file: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{display}: feature file is not valid UTF-8: {exc}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{display}:{lineno}"
        head, _, rest = stripped.partition(" ")
        head = head.rstrip(",")
        if not re.fullmatch(r"\d+", head):
            raise ProfileError(f"{where}: {head!r} is not a feature id; each line is '<id> [label]', e.g. '311 def keyword'")
        label = check_label(rest, where) if rest.strip() else None
        out.append((int(head), label, where))
    return out


@dataclasses.dataclass
class ParsedFeatures:
    """One file's ``[features]`` table, before inheritance."""

    listed: list[WatchedFeature]  # from ids and file: no bounds of their own
    tables: list[WatchedFeature]  # from [features.<id>] tables
    disabled: set[int]
    defaults: tuple[tuple[str, Any], ...] | None
    defaults_source: str
    min_firings: int | None
    severity: str | None


def parse_features_table(table: Any, src: Source) -> ParsedFeatures:
    """Validate one profile's ``[features]`` table (see the module docstring)."""
    where = f"{src.display}: [features]"
    if not isinstance(table, dict):
        raise ProfileError(f"{src.display}: key 'features' must be a table [features], got {type_name(table)}")
    parsed = ParsedFeatures([], [], set(), None, "", None, None)
    for key, value in table.items():
        kwhere = f"{where} key '{key}'"
        if key == "ids":
            if not isinstance(value, list):
                raise ProfileError(f"{kwhere}: must be an array of feature ids like [12, 40, 311], got {type_name(value)}")
            for i, item in enumerate(value):
                parsed.listed.append(WatchedFeature(id=_feature_id(item, f"{kwhere} item {i}"), source=f"{where} key 'ids'"))
        elif key == "file":
            if not isinstance(value, str) or not value.strip():
                raise ProfileError(f"{kwhere}: must be a path to a file of feature ids, got {type_name(value)}")
            handle = Path(value) if Path(value).is_absolute() else src.sibling(value)
            display = os.fspath(handle) if isinstance(handle, Path) else str(handle)
            try:
                exists = handle.is_file()
            except OSError:
                exists = False
            if not exists:
                raise ProfileError(f"{kwhere}: feature file '{value}' not found (looked at {display})")
            for fid, label, line in read_ids_file(handle, display):
                parsed.listed.append(WatchedFeature(id=fid, label=label, source=line))
        elif key == "min_firings":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProfileError(f"{kwhere}: must be a positive integer, got {type_name(value)}")
            parsed.min_firings = int(value)
        elif key == "severity":
            parsed.severity = _severity(value, kwhere)
        elif key == "defaults":
            dwhere = f"{src.display}: [features.defaults]"
            if not isinstance(value, dict):
                raise ProfileError(f"{kwhere}: must be a table [features.defaults] of bounds, got {type_name(value)}")
            bounds, _ = _bounds_table(value, dwhere, ())
            parsed.defaults = bounds
            parsed.defaults_source = dwhere
        elif re.fullmatch(r"\d+", key):
            fwhere = f"{src.display}: [features.{key}]"
            if not isinstance(value, dict):
                hint = f'; for a label write [features.{key}] with label = "..."' if isinstance(value, str) else ""
                raise ProfileError(f"{kwhere}: must be a table [features.{key}], got {type_name(value)}{hint}")
            bounds, extra = _bounds_table(value, fwhere, FEATURE_OPTION_KEYS)
            fid = int(key)
            if "enabled" in extra:
                if not isinstance(extra["enabled"], bool):
                    raise ProfileError(f"{fwhere} key 'enabled': must be true or false, got {type_name(extra['enabled'])}")
                if not extra["enabled"]:
                    parsed.disabled.add(fid)
                    continue
            label = check_label(extra["label"], f"{fwhere} key 'label'") if "label" in extra else None
            severity = _severity(extra["severity"], f"{fwhere} key 'severity'") if "severity" in extra else None
            parsed.tables.append(WatchedFeature(id=fid, label=label, bounds=bounds or None, severity=severity, source=fwhere))
        else:
            hint = suggest(key, FEATURES_KEYS)
            if key.lstrip("-").isdigit() or key.startswith("#"):
                hint = "a feature table is [features.<id>] with a non-negative integer id"
            raise ProfileError(f"{kwhere}: unknown key; {hint} (or [features.<id>] for one feature)")
    return parsed


def merge_watchlists(parent: Watchlist | None, child: ParsedFeatures | None) -> Watchlist | None:
    """A profile's watchlist from its parent's and its own ``[features]`` (see the module docstring)."""
    if child is None:
        return parent
    base = parent or Watchlist()
    entries: dict[int, WatchedFeature] = {f.id: f for f in base.features if f.id not in child.disabled}
    order = [f.id for f in base.features if f.id in entries]
    own_tables = {f.id: f for f in child.tables}
    for f in child.listed:
        if f.id in entries or f.id in child.disabled:
            continue
        entries[f.id] = f
        order.append(f.id)
    for fid, table in own_tables.items():
        listed = next((f for f in child.listed if f.id == fid), None)
        if table.label is None and listed is not None and listed.label is not None:
            table = dataclasses.replace(table, label=listed.label)  # a label from the file, bounds from the table
        if fid not in entries:
            order.append(fid)
        entries[fid] = table
    return Watchlist(
        features=tuple(entries[i] for i in order),
        defaults=child.defaults if child.defaults is not None else base.defaults,
        defaults_source=child.defaults_source if child.defaults is not None else base.defaults_source,
        min_firings=child.min_firings if child.min_firings is not None else base.min_firings,
        severity=child.severity if child.severity is not None else base.severity,
    )


def parse_feature_ids(text: str, source: str = "--sae-features") -> list[int]:
    """Ids from a command-line list, "12,40,311" (spaces allowed)."""
    ids = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            if str(text).strip():
                raise ProfileError(f"{source}: empty item in {text!r}; give comma-separated feature ids like 12,40,311")
            continue
        if not re.fullmatch(r"\d+", item):
            raise ProfileError(f"{source}: {item!r} is not a feature id (a non-negative integer); e.g. 12,40,311")
        ids.append(int(item))
    return ids


def add_watch_ids(watch: Watchlist | None, ids: Iterable[int], source: str = "--sae-features") -> Watchlist:
    """``watch`` with ``ids`` added (watched with the defaults); ids already watched keep their entries."""
    base = watch or Watchlist()
    have = {f.id for f in base.features}
    added = []
    for i in ids:
        fid = _feature_id(i, source)
        if fid not in have:
            have.add(fid)
            added.append(WatchedFeature(id=fid, source=source))
    return dataclasses.replace(base, features=base.features + tuple(added))


def check_ids_in_range(watch: Watchlist, d_sae: int, sae: str | None = None) -> None:
    """Every watched id names a feature of this SAE; a usage error naming the source otherwise.
    Call it as soon as the SAE is known, before the pass."""
    bad = [f for f in watch.features if not 0 <= f.id < d_sae]
    if bad:
        shown = "; ".join(f"{f.id} (from {f.source or 'the watchlist'})" for f in bad)
        which = f"SAE {sae!r}" if sae else "this SAE"
        raise ProfileError(f"watched feature ids outside {which}'s {d_sae} features [0, {d_sae}): {shown}")
