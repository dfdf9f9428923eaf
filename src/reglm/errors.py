"""The one exception family for user mistakes.

Anything the user can fix (a missing file, a bad option, a corrupted checkpoint) raises
:class:`ReglmError` with a message that names the problem and the fix. The CLI prints the
message and exits with status 2, without a traceback. Internal bugs raise ordinary exceptions.
"""


class ReglmError(Exception):
    """A user-facing error: bad input, bad option, bad file. The message says how to fix it."""


class TrainingDiverged(ReglmError):
    """A loss, validation score or parameter became NaN or infinite; nothing non-finite was written."""


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved in response to a stop request (SIGINT/SIGTERM)."""

    def __init__(self, signum: int, run_dir: object, step: int, message: str | None = None):
        self.signum = signum
        default = f"interrupted at step {step}; checkpoint saved. Resume with: reglm train --resume {run_dir}"
        super().__init__(message or default)
