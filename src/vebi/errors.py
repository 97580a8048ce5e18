"""Errors that vebi reports to users: each message says what went wrong and what to do."""


class VebiError(Exception):
    """A problem with the user's input or environment (not a bug); the CLIs print it and exit 1."""


class DataUnavailableError(VebiError):
    """A data set could be neither found locally nor fetched from any configured source."""


class CheckpointError(VebiError):
    """A checkpoint is missing, unreadable, or refers to code vebi does not trust."""


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
