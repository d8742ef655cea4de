"""Where profiles come from: the bundled folder, a user's file, and ``extends`` targets."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from .vocabulary import ProfileError


def bundled_dir() -> Path:
    """The folder that holds the bundled profiles.

    The top-level ``thresholds/`` folder is installed as ``pytest_sae_transfer/profiles``
    (see pyproject.toml); a source checkout reads it where it is.
    """
    here = Path(__file__).resolve().parent.parent  # the package folder
    for cand in (here / "profiles", here.parent / "thresholds"):
        if cand.joinpath("default.toml").is_file():
            return cand
    return here / "profiles"


def available_profiles() -> list[str]:
    """Names of the bundled profiles, sorted."""
    root = bundled_dir()
    try:
        entries = list(root.iterdir())
    except (OSError, FileNotFoundError):
        return []
    return sorted(e.name[: -len(".toml")] for e in entries if e.name.endswith(".toml") and e.is_file())


def profile_for_release(release: str | None) -> str:
    """The bundled profile named after an SAE release if there is one, else ``"default"``."""
    if release:
        name = str(release).strip()
        if name in available_profiles():
            return name
    return "default"


@dataclasses.dataclass(frozen=True)
class Source:
    ident: Any  # identity for cycle detection
    name: str
    display: str  # what error messages call the file
    handle: Any  # Path or Traversable
    bundled: bool

    def read_bytes(self) -> bytes:
        return self.handle.read_bytes()

    def sibling(self, rel: str) -> Any:
        if isinstance(self.handle, Path):
            return (self.handle.parent / rel).resolve()
        # A bundled Traversable: relative paths stay inside the bundled folder.
        return bundled_dir().joinpath(rel)


def _bundled_source(name: str) -> Source | None:
    root = bundled_dir()
    handle = root.joinpath(f"{name}.toml")
    try:
        if not handle.is_file():
            return None
    except OSError:  # pragma: no cover
        return None
    if not isinstance(handle, Path):
        try:
            handle = Path(os.fspath(handle))  # type: ignore[arg-type]
        except TypeError:
            pass
    display = str(handle)
    return Source(ident=("bundled", name), name=name, display=display, handle=handle, bundled=True)


def _path_source(path: Path) -> Source:
    path = Path(path).expanduser()
    resolved = path.resolve()
    return Source(ident=resolved, name=path.stem, display=str(path), handle=resolved, bundled=False)


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text or (os.altsep or "/") in text


def is_number(value: Any) -> bool:
    """A TOML number: int or float, not a boolean (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """A TOML value as an error message names it: its type, and the value where it is short."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return f"{type(value).__name__} {value!r}"


def suggest(word: str, options: Iterable[str]) -> str:
    options = [o for o in options]
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid: " + ", ".join(f"'{o}'" for o in options)


def resolve_entry(name_or_path: str | os.PathLike[str]) -> Source:
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"{path}: threshold profile file not found")
        return _path_source(path)
    text = str(name_or_path).strip()
    if not text:
        raise ProfileError("empty threshold profile name; bundled: " + ", ".join(available_profiles()))
    if _looks_like_path(text):
        path = Path(text)
        if not path.is_file():
            hint = ""
            if path.stem in available_profiles():
                hint = f"; for the bundled profile use the name '{path.stem}'"
            raise ProfileError(f"{text}: threshold profile file not found{hint}")
        return _path_source(path)
    src = _bundled_source(text)
    if src is not None:
        return src
    if Path(text).is_file():
        return _path_source(Path(text))
    raise ProfileError(
        f"unknown threshold profile '{text}': {suggest(text, available_profiles())} "
        "(give a bundled profile name or a path to a .toml file)"
    )


def resolve_extends(target: Any, child: Source) -> Source:
    where = f"{child.display}: [profile] key 'extends'"
    if not isinstance(target, str) or not target.strip():
        raise ProfileError(f"{where}: must be a non-empty string naming a profile, got {target!r}")
    target = target.strip()
    if _looks_like_path(target):
        if Path(target).is_absolute():
            handle: Any = Path(target)
        else:
            handle = child.sibling(target)
        if isinstance(handle, Path):
            if not handle.is_file():
                raise ProfileError(f"{where}: profile file '{target}' not found (looked at {handle})")
            return _path_source(handle)
        if not handle.is_file():
            raise ProfileError(f"{where}: bundled profile file '{target}' not found")
        return Source(("bundled", handle.name), Path(handle.name).stem, str(handle), handle, True)
    src = _bundled_source(target)
    if src is None:
        raise ProfileError(
            f"{where}: unknown profile '{target}'; {suggest(target, available_profiles())} "
            "(bundled names, or a path ending in .toml relative to this file)"
        )
    return src


_LINE_COL = re.compile(r"at line (\d+), column (\d+)")


def read_toml(src: Source) -> dict[str, Any]:
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{src.display}: cannot read threshold profile: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{src.display}: not valid UTF-8 TOML: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{src.display}: TOML syntax error: {exc}"
        m = _LINE_COL.search(str(exc))
        if m:
            lines = text.splitlines()
            lineno = int(m.group(1))
            if 1 <= lineno <= len(lines):
                msg += f"\n    line {lineno}: {lines[lineno - 1].rstrip()}"
        raise ProfileError(msg) from None

