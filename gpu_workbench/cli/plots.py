"""matplotlib for `wb report`'s figures, imported only when a figure is drawn."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only backend, imported when a figure is drawn (a second of import
    that `wb report --help` and the CLI's one-line mistakes should not pay)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or a cluster node
    import matplotlib.pyplot as plt

    return plt
