"""matplotlib figures written to PNG files: ``prolip eval --plot`` and the bench's plots and heat map.

matplotlib is optional (the ``plot`` and ``bench`` extras): :func:`pyplot` imports it only when a figure is asked
for, on the file-only backend, so no display is needed.
"""

from __future__ import annotations

import io
import os
from typing import Any

from prolip.atomic import atomic_write

INSTALL_HINT = 'pip install "prolip[plot]"'


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only ``Agg`` backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_png(plt: Any, fig: Any, path: str | os.PathLike, dpi: float | None = None) -> None:
    """Write ``fig`` to ``path`` atomically as a 256-colour PNG, and close it.

    A palette keeps the same picture in about a third of the bytes (plots hold a few colours and their
    antialiased edges).
    """
    from PIL import Image

    rendered, image = io.BytesIO(), io.BytesIO()
    fig.savefig(rendered, format="png", dpi=dpi)
    plt.close(fig)
    Image.open(rendered).convert("RGB").quantize(256).save(image, format="PNG", optimize=True)
    atomic_write(path, [image.getvalue()])
