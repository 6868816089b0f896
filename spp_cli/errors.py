"""Exceptions the CLI turns into one-line messages (exit code 1, no traceback).

Every message names the file it is about and the problem, e.g.
``raccoon-7.xml: object 2 has no <bndbox>``.
"""


class SPPError(Exception):
    """Base class: a user-facing problem with the input, not a bug."""


class ImageError(SPPError):
    """An image file that cannot be read, or is too large."""


class DatasetError(SPPError):
    """A dataset, annotation or split file that cannot be understood."""


class ProposalError(SPPError):
    """A proposals file that is missing, malformed or of another version."""


class CacheError(SPPError):
    """A feature cache that is damaged or was built with other settings."""


class ModelError(SPPError):
    """A backbone or detector that cannot be built or loaded."""


class UsageError(SPPError):
    """Options that do not go together."""
