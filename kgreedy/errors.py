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


class RecipeError(KgreedyError):
    """A recipe key is unknown, of the wrong type or out of range."""


class DataError(KgreedyError):
    """The data configuration cannot be used (missing files, unprepared dataset)."""
