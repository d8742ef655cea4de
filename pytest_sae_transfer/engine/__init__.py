"""The transfer engine: one streaming pass over the tokens for the base and every finetune.

Pure torch, usable without pytest::

    report = evaluate_transfer(base, {"ft": finetune}, sae, tokens)

Modules: ``options`` (options, error, outputs) · ``runner`` (a model cut at the
hook, its continuations, CE and KL) · ``sweep`` (the batch loop with out-of-memory
halving) · ``spill`` (sequential mode's scratch files) · ``assemble`` (results
from the accumulators) · ``transfer`` (``run_transfer``) · ``memory`` (the predicted
device memory of a run, and the batch size / sequential plan taken from it on CUDA).
May import: ``errors``, ``loading``, ``metrics``, ``report``.
"""

from . import memory
from .options import ENGINE_VERSION, BaseState, EngineError, EngineOptions, EngineOutput, EngineRun
from .runner import ModelRunner, hook_layer
from .transfer import evaluate_transfer, run_transfer, run_transfer_many

__all__ = [
    "ENGINE_VERSION",
    "BaseState",
    "EngineError",
    "EngineOptions",
    "EngineOutput",
    "EngineRun",
    "ModelRunner",
    "evaluate_transfer",
    "hook_layer",
    "memory",
    "run_transfer",
    "run_transfer_many",
]
