"""The building blocks of config validation: every failure is one ``ValueError`` line that names the key, its value
and the rule, e.g. ``config.optim.clip_norm=-5.0: must be a finite number >= 0``.

Each module checks its own block (``swin_ssl.objectives.moby.check``, ``swin_ssl.train.optim.check``, ...);
``swin_ssl.train.validate`` and ``swin_ssl.evaluators.run`` compose them.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Mapping


def fail(key: str, value: Any, rule: str):
    raise ValueError(f"config.{key}={value!r}: {rule}")


def _number(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        fail(key, value, "must be a number")
    if math.isnan(number):
        fail(key, value, "must be a number, not NaN")
    return number


def positive(key: str, value: Any) -> None:
    """``value > 0`` (sizes, counts, temperatures)."""
    if not _number(key, value) > 0:
        fail(key, value, "must be > 0")


def non_negative(key: str, value: Any) -> None:
    """A finite ``value >= 0`` (learning rates, clip norms, weight decay, seeds)."""
    number = _number(key, value)
    if not (math.isfinite(number) and number >= 0):
        fail(key, value, "must be a finite number >= 0")


def unit_interval(key: str, value: Any) -> None:
    """``0 <= value <= 1`` (momentums, EMA rates, loss weights)."""
    if not 0.0 <= _number(key, value) <= 1.0:
        fail(key, value, "must be in [0, 1]")


def known_keys(block: Mapping, known: Iterable[str], prefix: str) -> None:
    """Every key of ``block`` must be in ``known``; an unknown one fails with the closest known key."""
    known = sorted(known)
    for key in block.keys():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1) or [k for k in known if k.startswith(key)][:1]
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            where = f"config.{prefix[:-1]}" if prefix else "config"
            raise ValueError(f"config.{prefix}{key}: unknown key{hint} (known in {where}: {', '.join(known)})")
