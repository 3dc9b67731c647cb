"""Errors a user can fix; `train.main` prints their message without a traceback and exits 2."""


class RunError(Exception):
    """Base of the errors below."""


class ConfigError(RunError):
    """A run configuration that cannot be used; the message names the key and what to do."""


class ResumeError(RunError):
    """A checkpoint that this run cannot continue from; the message says what differs."""
