"""What one run measured, as objects and as files.

Modules: ``model`` (the result objects and their JSON form) · ``features``
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
from .model import SCHEMA_VERSION, CheckResult, FinetuneResult, ModelResult, TransferReport
from .view import MetricView, PairResult

__all__ = [
    "FEATURE_VECTOR_KEYS",
    "MODEL_METRIC_KEYS",
    "PAIRED_METRIC_KEYS",
    "SCHEMA_VERSION",
    "STALE_TEMP_AGE_S",
    "CheckResult",
    "FeatureArrays",
    "FinetuneResult",
    "MetricView",
    "ModelResult",
    "PairResult",
    "TransferReport",
    "atomic_write",
    "decode_histograms",
    "decode_topk",
    "encode_histograms",
    "encode_topk",
]
