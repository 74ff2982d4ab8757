"""Range checks for numeric options, and the parsing of name lists, shared by the Python API, the CLI and the
service.

Library entry points call :func:`check_number` on their numeric arguments before doing any work,
so ``--max-steps -1`` or ``lr=nan`` fail at once with an :class:`InputError` naming the option,
the value and the range, instead of training zero steps or producing NaN weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

from .errors import InputError


def check_number(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Raise ``InputError`` unless ``value`` is a finite number in the range.

    ``minimum`` is inclusive unless ``exclusive_minimum`` (e.g. a learning rate must be > 0);
    ``maximum`` is inclusive. ``integer`` requires a whole number (bools are refused).
    ``optional`` lets ``None`` through (an option left at "not set").
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {value!r}", parameter=name)
    if integer and not isinstance(value, Integral):
        raise InputError(f"{name} must be a whole number, got {value!r}", parameter=name)
    try:
        number = float(value)
    except OverflowError:  # a whole number past float's range (10**400): Integral, as only those overflow here
        digits = len(str(abs(value)))
        raise InputError(f"{name} must be a finite number, got a whole number of {digits} digits",
                         parameter=name) from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value}", parameter=name)
    if minimum is not None and (number <= minimum if exclusive_minimum else number < minimum):
        raise InputError(f"{name} must be {'>' if exclusive_minimum else '>='} {_show(minimum)}, got {value}"
                         + (f" (range {_describe(minimum, maximum, exclusive_minimum)})" if maximum is not None
                            else ""), parameter=name)
    if maximum is not None and number > maximum:
        raise InputError(f"{name} must be <= {_show(maximum)}, got {value} "
                         f"(range {_describe(minimum, maximum, exclusive_minimum)})", parameter=name)


def check_numbers(checks: dict[str, tuple[object, dict]]) -> None:
    """Several checks at once: ``{"lr": (config.lr, {"minimum": 0, "exclusive_minimum": True})}``."""
    for name, (value, bounds) in checks.items():
        check_number(name, value, **bounds)


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _describe(minimum: float | None, maximum: float | None, exclusive: bool) -> str:
    low = "-inf" if minimum is None else _show(minimum)
    return f"{'(' if exclusive else '['}{low}, {_show(maximum) if maximum is not None else 'inf'}]"


def split_names(values: str | Sequence[str]) -> list[str]:
    """Names given comma-separated, in one string or in several (a repeatable option: ``--labels a,b --labels
    c``), trimmed, blanks dropped, in order."""
    texts = [values] if isinstance(values, str) else values
    return [name.strip() for text in texts for name in text.split(",") if name.strip()]
