"""The one exception family for user mistakes.

Anything the user can fix (a missing file, a bad option, a corrupted checkpoint) raises
:class:`ReglmError` with a message that names the problem and the fix. The CLI prints the
message and exits with status 2, without a traceback. Internal bugs raise ordinary exceptions.
"""


class ReglmError(Exception):
    """A user-facing error: bad input, bad option, bad file. The message says how to fix it."""
