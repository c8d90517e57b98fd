"""Errors that the command-line front ends turn into one line and an exit status:
`KgreedyError` into status 2, a `Stopped` into its own
(docs/DESIGN.md, "Command line")."""

# Exit statuses of the work stopping (`Stopped.exit_status`), from BSD's sysexits.h so
# that a scheduler can tell them apart: 2 (usage) and 1 (anything unexpected, with its
# traceback) are `kgreedy.cli`'s.
EXIT_NONFINITE_LOSS = 65  # EX_DATAERR: the numbers went wrong; change the recipe
EXIT_LOST_WORKER = 69     # EX_UNAVAILABLE: a peer went away; rerun every worker
EXIT_OUT_OF_MEMORY = 71   # EX_OSERR: the machine could not give the memory
EXIT_DISK_FULL = 74       # EX_IOERR: a write failed for want of space
EXIT_PREEMPTED = 75       # EX_TEMPFAIL: stopped on request; rerun with --resume


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

    The command-line front ends print `kgreedy: <prefix><message>` on one line and
    exit with `exit_status`.
    """

    exit_status = 1
    prefix = ""


class TrainingStopped(Stopped):
    """Training stopped before the end; the message says which checkpoint, if any,
    to continue from."""


class SearchFailed(Stopped):
    """No trial of a search completed, or too many failed in a row."""


class NonFiniteLoss(TrainingStopped):
    """A train step's loss was NaN or infinite; nothing after it was saved.

    Exit status 65 (EX_DATAERR): rerunning as it is would fail again; the recipe (its
    learning rate) or the data must change.
    """

    exit_status = EXIT_NONFINITE_LOSS


class Preempted(TrainingStopped):
    """SIGTERM arrived: the steps in flight finished and a checkpoint was written.

    Exit status 75 (EX_TEMPFAIL, "try again later"): a scheduler that restarts on
    this status should rerun the same command with `--resume`.
    """

    exit_status = EXIT_PREEMPTED


class Fault(Stopped):
    """The machine failed the work: a worker went away, a disk filled up, memory ran
    out (`kgreedy.base.faults.classify` finds them in TensorFlow's and Python's
    errors). The message names what happened and what to do; the front ends print it
    as `kgreedy: error: <message>`."""

    prefix = "error: "


class LostWorker(Fault):
    """Another worker of a multi-worker run stopped answering (killed, crashed, its
    machine gone); the collectives were aborted. Rerun every worker with --resume."""

    exit_status = EXIT_LOST_WORKER


class OutOfMemory(Fault):
    """An allocation failed: the model or the batch does not fit in memory."""

    exit_status = EXIT_OUT_OF_MEMORY


class DiskFull(Fault):
    """A write failed because its filesystem is full (or over its quota)."""

    exit_status = EXIT_DISK_FULL
