"""Options, ini keys and environment variables, resolved into one frozen :class:`RunConfig`.

Every option exists three ways: ``--flag`` on the command line, an ini key
(``[tool.pytest.ini_options]`` or pytest.ini) and an environment variable.
Precedence: command line > environment > ini > default. A ``sae_*`` ini key or
``PYTEST_SAE_*`` variable that is not an option is a usage error with the nearest
valid name, so that a typo cannot silently turn the gate off. No torch here.

Modules: ``options`` (the option table and its registration with pytest) · ``run``
(``RunConfig``, validation, finetune labels, the marker's keywords) · ``sources``
(reading the command line, the environment and the ini file).
May import: ``errors``.
"""

from .options import ENV_PREFIX, INI_ALIASES, OPTIONS, OPTIONS_BY_DEST, OptionSpec, add_options
from .run import MARKER_KEYS, ConfigError, RunConfig, finetune_labels, from_marker, parse_outlier_norm, validate
from .sources import check_unknown_names, resolve

__all__ = [
    "ENV_PREFIX",
    "INI_ALIASES",
    "MARKER_KEYS",
    "OPTIONS",
    "OPTIONS_BY_DEST",
    "ConfigError",
    "OptionSpec",
    "RunConfig",
    "add_options",
    "check_unknown_names",
    "finetune_labels",
    "from_marker",
    "parse_outlier_norm",
    "resolve",
    "validate",
]
