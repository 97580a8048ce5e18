"""Errors that vebi reports to users: each message says what went wrong and what to do."""


class VebiError(Exception):
    """A problem with the user's input or environment (not a bug); the CLIs print it and exit 1."""


class DataUnavailableError(VebiError):
    """A data set could be neither found locally nor fetched from any configured source."""


class CheckpointError(VebiError):
    """A checkpoint is missing, unreadable, or refers to code vebi does not trust."""
