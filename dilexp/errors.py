"""The one error type a user sees for a bad setting: it names the config field."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work, raised before any work starts.

    The message always starts with the dotted config field, so the one line a user
    sees says what to change: ``attention.dilation_rates: ...``.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")
