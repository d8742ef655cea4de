"""pytest-sae-transfer: does a base model's sparse autoencoder still work on a finetune?

Importing this package is light (no torch); the library API is loaded on first use::

    from pytest_sae_transfer import evaluate_transfer, EngineOptions
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "evaluate_transfer": "pytest_sae_transfer.engine",
    "run_transfer": "pytest_sae_transfer.engine",
    "EngineOptions": "pytest_sae_transfer.engine",
    "TransferReport": "pytest_sae_transfer.report",
    "FinetuneResult": "pytest_sae_transfer.report",
    "ModelResult": "pytest_sae_transfer.report",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_sae_transfer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
