"""Errors a user can act on.

Every error raylib raises for bad input says *where* (the config field or file) and *how to
fix it*. The CLI prints these in one line without a traceback and exits with code 2, before
any cluster resources are spent.
"""


class RaylibError(Exception):
    """Base class for errors that carry a user-facing message."""

    exit_code = 1


class ConfigError(RaylibError):
    """The job (or search/serve) config is invalid. `field` is the dotted path."""

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str | None = None):
        self.field, self.problem, self.fix = field, problem, fix
        message = f"{field}: {problem}" if field else problem
        if fix:
            message += f" (fix: {fix})"
        super().__init__(message)

    def __reduce__(self):  # Ray pickles exceptions raised in workers/trials: keep all three parts
        return (self.__class__, (self.field, self.problem, self.fix))


class DataError(ConfigError):
    """The data named by the config cannot be used (missing file, empty, no valid rows)."""


class TrainingFailed(RaylibError):
    """A run started but failed; the message says where and where its log is."""

    exit_code = 1
