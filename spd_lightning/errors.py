"""Errors a user can fix. run.py prints their message alone, without a stack trace."""


class SPDError(Exception):
    """Bad input or configuration; the message names the culprit and what to do."""


class RecordError(SPDError, ValueError):
    """A record file that cannot be used; the message names the file, line and field."""


class SetupError(SPDError, RuntimeError):
    """A model, tokenizer or target that cannot be used as configured."""


class VerificationError(SPDError):
    """Too many samples could not be verified: the target backend is failing."""
