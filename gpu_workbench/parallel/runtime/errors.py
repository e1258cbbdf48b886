"""Mistakes a user can fix, told apart from bugs.

`UserError` (a bad config value, a missing file, an impossible layout) is printed by `wb` as one line
on stderr with exit code 2. Any other exception is a bug in this project or a library and keeps its
traceback. Both subclass the built-in errors the API has always raised (`ValueError`, `TypeError`),
so callers catching those keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the argument or field."""


class UserTypeError(UserError, TypeError):
    """A value of the wrong type (e.g. `steps=abc`)."""
