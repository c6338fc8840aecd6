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


class NotFound(UserError, FileNotFoundError):
    """A file or folder the user named (a model, an edit, a prompt file) is missing or is not
    what it should be; the message names the path."""


class EditError(UserError, ValueError):
    """An edit folder that cannot be used as asked: corrupt, written by a newer erasekit, its
    edit.json disagreeing with its tensors, or made for another model."""


class PhraseNotInPrompt(UserError, ValueError):
    """A concept (or keyword) that the prompt it should be found in does not contain."""
