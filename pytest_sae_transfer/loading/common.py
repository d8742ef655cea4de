"""What every loader shares: the error type, zoo lookups, name suggestions, devices
and dtypes, and file identities for the result cache."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import zoo
from ..errors import InputError


class LoadError(InputError):
    """A model, SAE or dataset could not be loaded; the message says how to fix it."""


#: Third-party warnings about what the plugin already handles: (message regex, category).
HANDLED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # sae_lens, on every SAE whose metadata has model_from_pretrained_kwargs: the plugin builds
    # the models with exactly those kwargs (loading/hf/configs.py, processing_flags).
    (r"\s*This SAE has non-empty model_from_pretrained_kwargs", UserWarning),
)


@contextlib.contextmanager
def quiet_third_party_warnings() -> Iterator[None]:
    """Silence the deprecation chatter sae_lens/transformer_lens/transformers emit on import and
    load (about their internals, not the user's code, it would fill every run's summary), and
    their warnings about what the plugin handles itself (``HANDLED_WARNINGS``)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.simplefilter("ignore", category)
        for message, handled in HANDLED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=handled)
        yield


def _zoo_has(check: Any, name: str) -> bool:
    """A zoo lookup that treats a missing zoo (e.g. a partial source checkout) as "not a zoo name"."""
    try:
        return bool(check(name))
    except FileNotFoundError:
        return False


def is_zoo_model(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_model, name)


def is_zoo_release(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_release, name)


def is_zoo_dataset(name: str) -> bool:
    return _zoo_has(zoo.is_zoo_dataset, name)


def zoo_release_names() -> list[str]:
    """The zoo's SAE releases; none when the zoo is missing."""
    try:
        return zoo.release_names()
    except FileNotFoundError:
        return []


def nearest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x' or 'y'?)' or '' when nothing is close."""
    matches = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"


# -- devices and dtypes -------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoadError(f"device {device!r} was asked for, but CUDA is not available here; use --sae-device cpu or auto")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise LoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise LoadError("device 'mps' was asked for, but Apple MPS is not available here; use --sae-device cpu or auto")
        return device
    if device == "cpu":
        return device
    raise LoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>")


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}{nearest(dtype, DTYPES)}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# -- identities for the cache -------------------------------------------------

_HASH_FULL_LIMIT = 512 << 20  # files above this are identified by name, size and mtime


def file_identity(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        st = path.stat()
        h.update(path.name.encode())
        h.update(str(st.st_size).encode())
        if st.st_size <= _HASH_FULL_LIMIT:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()

