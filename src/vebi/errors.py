"""Errors that vebi reports to users: each message says what went wrong and what to do."""

import math
import numbers
from typing import Literal, overload


class VebiError(Exception):
    """A problem with the user's input or environment (not a bug); the CLIs print it and exit 1."""


class DataUnavailableError(VebiError):
    """A data set could be neither found locally nor fetched from any configured source."""


class CheckpointError(VebiError):
    """A checkpoint is missing, unreadable, or refers to code vebi does not trust."""


@overload
def require_int_in_range(
    name: str, value: object, low: int, high: int | None = None, allow_none: Literal[False] = False
) -> int: ...


@overload
def require_int_in_range(
    name: str, value: object, low: int, high: int | None = None, allow_none: bool = False
) -> int | None: ...


def require_int_in_range(
    name: str, value: object, low: int, high: int | None = None, allow_none: bool = False
) -> int | None:
    """``value`` as an int when it lies in [low, high] (``high`` None: no upper bound); else a
    :class:`VebiError` that names the setting and the allowed range."""
    if value is None and allow_none:
        return None
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if allow_none:
        allowed += " or null"
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise VebiError(f"{name} must be {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise VebiError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def require_number(
    name: str, value: object, low: float, low_inclusive: bool = True, hint: str = ""
) -> float:
    """``value`` as a float when it is a finite real number (not a bool) above ``low`` (or equal
    to it when ``low_inclusive``); else a :class:`VebiError` that names the setting, says what
    it got and what is allowed (``hint``: what to do, appended)."""
    allowed = f"a finite number {'>=' if low_inclusive else '>'} {low:g}"
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(number) and (number >= low if low_inclusive else number > low)
    if not ok:
        got = f"{value!r} ({type(value).__name__})"
        raise VebiError(f"{name} must be {allowed}, got {got}" + (f": {hint}" if hint else ""))
    return number
