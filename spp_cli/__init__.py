"""spp: SPPnet object detection from the command line, and from Python.

``spp_cli.Detector.load()`` gives the shipped detector (or ``load(path)``
another); calling it on an image returns :class:`spp_cli.Detection` objects,
the same numbers as ``spp detect`` (see :mod:`spp_cli.api`). Both names load
on first use, so that ``spp --help`` stays instant.
"""

__version__ = "0.1.0"

__all__ = ["Detection", "Detector", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Detection"):
        from spp_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'spp_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
