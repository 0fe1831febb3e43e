"""The two ways a run ends on purpose, each with the message the CLI prints on one line."""


class ConfigError(ValueError):
    """A user-facing problem with the input (config, data, paths); the CLI prints it and exits with 2."""


class RunStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss, Ctrl-C, full disk); the message says why and what was
    kept. The CLI prints it and exits with 1."""
