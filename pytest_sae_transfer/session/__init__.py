"""One configuration's results, computed at most once per machine.

Modules: ``inputs`` (the SAE, tokens and models a configuration names, loaded
lazily) · ``store`` (cache keys and the encoding of results as cache entries) ·
``cache`` (the on-disk cache with its locks) · ``provenance`` (versions, what
the engine did) · ``session`` (``TransferSession``: cache or compute, then the
report with its checks).
May import: ``errors``, ``config``, ``loading``, ``metrics``, ``report``,
``engine``, ``thresholds``.
"""

from .cache import ResultCache, cache_key
from .session import TransferSession

__all__ = ["ResultCache", "TransferSession", "cache_key"]
