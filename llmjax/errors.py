"""The one exception type for mistakes a user can fix.

Errors raised where user input enters (config files, command-line values, checkpoints, data files,
Hugging Face directories) derive from :class:`UserError`; the CLI prints them as one line and exits
2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names it and says how to fix it."""
