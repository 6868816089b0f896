"""spp: SPPnet object detection from the command line, and from Python.

``spp_cli.Detector.load()`` gives the shipped detector (or ``load(path)``
another); calling it on an image returns :class:`spp_cli.Detection` objects,
the same numbers as ``spp detect`` (see :mod:`spp_cli.api`). Both names load
on first use, so that ``spp --help`` stays instant.
"""

import os

__version__ = "0.1.0"

# MKL's AVX-512 code paths add up a product in an order that depends on the thread count, so
# `--threads`, `torchrun`'s ranks and SLURM's tasks would train different models from the same
# cache (SVM biases 1% apart on a CPU with AVX-512). Its AVX2 paths in the strict reproducible
# mode give the same bits whatever the thread count, on every CPU that has AVX2 (without
# STRICT, a product of many windows with a few classes' SVMs still moved with the threads; the
# dot products MKL does not cover are svm._dot's). Read by MKL at its first call; a value the
# user set is kept.
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

__all__ = ["Detection", "Detector", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Detection"):
        from spp_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'spp_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
