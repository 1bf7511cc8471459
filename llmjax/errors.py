"""The one exception type for mistakes a user can fix, and its general-purpose kinds.

Errors raised where user input enters (config files, command-line values, checkpoints, data files,
Hugging Face directories) derive from :class:`UserError`; the CLI prints them as one line and exits
2. Anything else is a bug and keeps its traceback. Modules with their own kind of input define their
own subclass (``ConfigError``, ``TokenizerError``, ``CheckpointCorruptError``, ...); the kinds here
serve the rest. Each also derives from the built-in exception a Python caller would expect.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names it and says how to fix it."""


class InputError(UserError, ValueError):
    """An argument or setting the user gave is out of its allowed range or inconsistent."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or lacks a file it must hold)."""


class DataError(UserError, ValueError):
    """A user's data file or example is malformed; the message names the file, the line and the field."""
