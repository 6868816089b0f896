"""Every benchmark times this checkout's spp_cli, never an installed copy.

Import it before anything from spp_cli: it puts the repository first on
``sys.path``, and :data:`ENV` carries the same into ``python -m spp_cli``
subprocesses through PYTHONPATH. :func:`check` fails loudly if another copy
was imported all the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def check() -> None:
    """Stop unless the imported spp_cli is the one in this checkout."""
    import spp_cli

    where = Path(spp_cli.__file__).resolve().parent
    if where != REPO / "spp_cli":
        sys.exit(f"benchmarks: imported spp_cli from {where}, not from this checkout ({REPO / 'spp_cli'})")
