"""What one run measured, as objects and as files.

Modules: ``results`` (one model's, one finetune's and one check's results) · ``model``
(one SAE's report, the run's report, and their JSON form) · ``features``
(per-feature arrays and their one key encoding) · ``files`` (atomic writes) ·
``contexts`` (token windows as text) · ``feature_section`` (a finetune's worst and
watched features, with their text) · ``view`` (the result object custom tests
receive). The engine fills these
objects; thresholds, the session and the renderers read them.
May import: ``errors``, ``metrics.keys``.
"""

from ..metrics.keys import FEATURE_VECTOR_KEYS, MODEL_METRIC_KEYS, PAIRED_METRIC_KEYS
from .features import FeatureArrays, decode_histograms, decode_topk, encode_histograms, encode_topk
from .files import STALE_TEMP_AGE_S, atomic_write
from .model import SAE_CONFIG_KEYS, SCHEMA_VERSION, RunReport, TransferReport
from .results import CheckResult, FinetuneResult, ModelResult
from .view import MetricView, PairResult

__all__ = [
    "FEATURE_VECTOR_KEYS",
    "MODEL_METRIC_KEYS",
    "PAIRED_METRIC_KEYS",
    "SAE_CONFIG_KEYS",
    "SCHEMA_VERSION",
    "STALE_TEMP_AGE_S",
    "CheckResult",
    "FeatureArrays",
    "FinetuneResult",
    "MetricView",
    "ModelResult",
    "PairResult",
    "RunReport",
    "TransferReport",
    "atomic_write",
    "decode_histograms",
    "decode_topk",
    "encode_histograms",
    "encode_topk",
]
