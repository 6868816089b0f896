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


def check_class_names(names: list[str], classes: list[str], source: str, error: type[SPPError] = SPPError) -> None:
    """A run's class filter (``--classes``) against the classes ``source`` holds.

    Raises:
        error: ``"{source}: has no class 'x', 'y' (its classes: a, b, ...)"``, naming each missing one.
    """
    missing = [name for name in names if name not in classes]
    if missing:
        shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        raise error(f"{source}: has no class {', '.join(repr(name) for name in missing)} (its classes: {shown})")
