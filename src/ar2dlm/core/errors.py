"""The error a user can act on. It sits at the bottom of the package: every layer raises it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting, flag or input has a value a user must change; the message says what and how.

    `field` names the setting (dataclass field, as in `draft_len` or `optim.lr`) the error is about, or None
    when it is about no single setting (a file, a model, a prompt). Tests check it instead of the wording.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
