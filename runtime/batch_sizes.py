"""Batch-size lists ("1,8,32"): one parser for the host commands, the harness and the agent."""

# Stdlib only and Python 3.6-compatible on purpose: devices/target.py ships this file beside
# the on-device agent (as batch_sizes.py), where edge_ssl is not installed. On the host the
# errors are edge_ssl's ConfigError; on the device they are ValueError, which the agent
# reports as its JSON error.
import numbers
import re

try:
    from edge_ssl.errors import ConfigError as _BadBatchSizes
except ImportError:  # on the device
    _BadBatchSizes = ValueError

EXAMPLE = "1,8,32"


def parse_batch_sizes(value, name="batch sizes"):
    """'1,8,32' or (1, 8, 32) -> (1, 8, 32): positive integers, in the order given.

    ``name`` is what the message calls the setting (an option such as "--batch"); anything
    else (empty, "1,x", 0, -2, 1.5, True) raises ConfigError (ValueError on the device).
    """
    text = value if isinstance(value, str) else None
    parts = [p.strip() for p in value.split(",") if p.strip()] if text is not None else list(value)
    sizes = []
    for part in parts:
        size = _whole_number(part)
        if size is None or size < 1:
            raise _bad(name, value, f"{part!r} is not an integer >= 1")
        sizes.append(size)
    if not sizes:
        raise _bad(name, value, "no batch size given")
    return tuple(sizes)


def _whole_number(part):
    if isinstance(part, bool):
        return None
    if isinstance(part, numbers.Integral):
        return int(part)
    if isinstance(part, str) and re.fullmatch(r"[+-]?[0-9]+", part):
        return int(part)
    return None


def _bad(name, value, why):
    shown = value if isinstance(value, str) else list(value)
    return _BadBatchSizes(
        f"{name} must be comma-separated integers >= 1, e.g. {EXAMPLE}; got {shown!r} ({why})."
    )
