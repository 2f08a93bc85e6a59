"""The one exception type for problems a user can fix (bad file, bad option, broken model).

The CLI turns an `NmtError` into a single line on stderr and exit code 1 (2 for `UsageError`);
anything else is a bug: "internal error", exit code 3, its traceback under `--verbose`.
"""


class NmtError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UsageError(NmtError):
    """An option value that cannot work (exit code 2, like other usage errors)."""


class Interrupted(NmtError):
    """A run stopped by a signal after saving its state: the CLI exits 128 + the signal's number,
    as a shell reports a process killed by it, so a scheduler can tell it from a finished run."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
