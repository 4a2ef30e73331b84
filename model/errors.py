"""The project's own errors: bad input, each said in one line that names the file or option and the problem.

`lsrm.py` prints these as `error: <message>` (exit status 2) and nothing more; any other exception is a bug
and keeps its traceback. Each is also a ValueError (MissingPackage an ImportError), as before they had a base.
"""


class LsrmError(Exception):
    """Bad input, said in one line: the base of every error the command line prints without a traceback."""


class UserError(LsrmError, ValueError):
    """Bad input from the user: a command's option, or a path that is not what it should be."""


class ConfigError(UserError):
    """A config value of the wrong type or out of range (a preset with `--set` overrides, or a checkpoint's)."""


class DataError(LsrmError, ValueError):
    """An input file (a dataset's, a tokenizer's) is missing or wrong. The message is '<file>: <problem>'."""


class CheckpointError(LsrmError, ValueError):
    """A checkpoint that is missing, corrupt or does not fit the model: one line naming the file."""


class WeightsError(LsrmError, ValueError):
    """A backbone checkpoint that does not fit the model; the message names the key or field and the file."""


class Diverged(LsrmError, ValueError):
    """A non-finite loss or adapter weight: training stops at that step, saying which checkpoint is kept."""


class MissingPackage(LsrmError, ImportError):
    """An optional package a file format needs is not installed; the message says what to install."""
