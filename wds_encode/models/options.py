"""Validation of encoder/decoder `config` objects, shared by every codec: errors name the JSON field."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ModelConfigError


def check_options(cfg: Mapping[str, Any], field: str, kind: str, *, allowed: set[str],
                  required: set[str] = frozenset(), positive_ints: set[str] = frozenset(),
                  int_lists: set[str] = frozenset()) -> dict[str, Any]:
    """Validate an encoder/decoder `config` object; every error names the JSON field."""
    if not isinstance(cfg, Mapping):
        raise ModelConfigError(f"'{field}' must be an object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ModelConfigError(
            f"'{field}' has unknown {kind} option(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(k for k in required if cfg.get(k) is None)
    if missing:
        raise ModelConfigError(f"'{field}' is missing required {kind} option(s) {missing}")
    # null means "use the default", as an absent key does
    out = {k: v for k, v in cfg.items() if v is not None}
    for key in int_lists & set(out):
        value = out[key]
        if (not isinstance(value, (list, tuple)) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in value)):
            raise ModelConfigError(f"'{field}.{key}' must be a non-empty list of positive ints, "
                                   f"got {value!r}")
        out[key] = list(value)
    for key in positive_ints & set(out):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"'{field}.{key}' must be a positive int, got {value!r}")
    return out
