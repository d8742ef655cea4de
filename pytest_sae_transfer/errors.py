"""The one kind of error a user can cause.

Every layer (options, loading, engine, threshold profiles) raises a subclass of
:class:`InputError` when the user's input is wrong, with a message that says
what was wrong and what would be right. The plugin turns it into a pytest usage
error (or, inside a test, into a one-line failure) in one place, with no
traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input: a name, path, option value or profile that cannot be used as given."""
