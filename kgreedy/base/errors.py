"""Errors that the command-line front ends turn into exit status 2."""


def format_value(value):
    """Formats a received value for an error message, shortened when long."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class KgreedyError(Exception):
    """Bad usage, a bad recipe or an unusable data configuration.

    The command-line front ends print `kgreedy: error: <message>` on one line and
    exit with status 2. Raised before anything is written to disk.

    Args:
        path: the recipe key (dotted JSON path), flag or file that is wrong.
        message: what is wrong with it.
        received: the offending value, if any; shown as `received <repr>`.
    """

    _MISSING = object()

    def __init__(self, path, message, received=_MISSING):
        self.path = path
        self.message = message
        self.received = received
        text = f"{path}: {message}" if path else message
        if received is not KgreedyError._MISSING:
            text += f"; received {format_value(received)}"
        super().__init__(text)

    def at(self, path):
        """The same error, about `path` instead (a flag instead of a parameter)."""
        if self.received is KgreedyError._MISSING:
            return type(self)(path, self.message)
        return type(self)(path, self.message, self.received)


class RecipeError(KgreedyError):
    """A recipe key is unknown, of the wrong type or out of range."""


class DataError(KgreedyError):
    """The data configuration cannot be used (missing files, unprepared dataset)."""


class Stopped(Exception):
    """The work stopped before its end, for a reason the message gives in one line.

    The command-line front ends print `kgreedy: <message>` on one line and exit with
    `exit_status`.
    """

    exit_status = 1


class TrainingStopped(Stopped):
    """Training stopped before the end; the message says which checkpoint, if any,
    to continue from."""


class SearchFailed(Stopped):
    """No trial of a search completed, or too many failed in a row."""


class NonFiniteLoss(TrainingStopped):
    """A train step's loss was NaN or infinite; nothing after it was saved."""

    exit_status = 1


class Preempted(TrainingStopped):
    """SIGTERM arrived: the steps in flight finished and a checkpoint was written.

    Exit status 75 (EX_TEMPFAIL, "try again later"): a scheduler that restarts on
    this status should rerun the same command with `--resume`.
    """

    exit_status = 75
