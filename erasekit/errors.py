"""Errors that a user's input causes (a bad setting, an output path that may not be replaced).

The command line prints such an error as one line and exits with status 2; any other exception
is a bug and keeps its traceback. This module imports nothing from the package, so every layer
may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A method, preset or setting that is unknown or out of range; the one-line message names
    the method, the setting, the bad value and what is allowed."""


class UnknownName(UserError, ValueError):
    """A name that no registry knows (a detector, suite, lexicon or pipeline name); the message
    lists the known ones."""
