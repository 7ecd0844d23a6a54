"""Errors users of the control plane and CLI can hit.

    SidestepError            a problem we explain to the user and exit non-zero
    ├── ConfigError          the config file is invalid: every issue with its field path
    └── StackError           starting or stopping the local processes failed
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue", "SidestepError", "StackError"]


class SidestepError(Exception):
    """Base of the errors the CLI reports as a message, not a traceback."""


@dataclass(frozen=True)
class ConfigIssue:
    path: str  # field path in the file, "" for the whole file
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(SidestepError):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class StackError(SidestepError):
    pass
