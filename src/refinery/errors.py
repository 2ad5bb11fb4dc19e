"""User-facing errors: the CLI prints their message (no traceback) and exits non-zero.

Each one says what was wrong with the *input* and names the offending thing
(the URL, the archive entry, the file, the expectation), because that is what a
user needs to fix it.
"""


class RefineryError(Exception):
    """Base of the errors a user can act on. The CLI exits 1 (bad data, unreachable
    services), or 2 for a :class:`ParamsError`."""


class ParamsError(RefineryError, ValueError):
    """Params that cannot work: a schema violation, or a value the data or the
    machine makes infeasible. ``str()`` names the key and, where one is known,
    a value that would work."""


class TrainingDiverged(ParamsError):
    """The loss became inf/NaN: the learning rate (named in the message) is too high."""


class DownloadError(RefineryError):
    """The source could not be fetched (network, HTTP status, missing file)."""


class ChecksumMismatch(DownloadError):
    """The fetched bytes are not the ones the checksum names."""


class UnsafeArchiveError(RefineryError):
    """An archive entry would escape the target folder, or the archive is a bomb."""


class DataLayoutError(RefineryError):
    """The source's folders or records are not the expected layout."""


class DataValidationFailed(RefineryError):
    """Great Expectations rejected the data; the message is the human summary."""


class TrackingError(RefineryError):
    """The tracking server is unreachable and the params say to fail fast."""
