"""Figures: region maps the right way up, curves, bars, filter grids, stem plots. Always saved, never shown.

Orientation convention (see ``common.infra.data.grid``): a label raster has shape (ny, nx) with row 0 at the
*lowest* y; ``region_map`` draws it with ``origin="lower"`` and the grid's extent, so the colour under
a point (x, y) is the label of that point. Rasters use nearest-neighbour interpolation: labels never blend.
"""
from __future__ import annotations

import os
import signal
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from ..infra.outputs import ConfigError, atomic_write, write_json  # noqa: E402


class OverlapWarning(UserWarning):
    """A saved figure has text that runs into other text (titles, axis labels, the suptitle)."""


def overlapping_text(fig) -> list[tuple[str, str]]:
    """Pairs of the figure's titles, suptitle and axis labels whose drawn boxes overlap (after a draw)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t is not None and t.get_text().strip()
             and t.get_visible()]
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]


DRAW_SECONDS = 300   # the most one figure may take to draw (a few seconds normally)
MAX_EXTENT_PX = 1e7  # a curved patch larger than this (in pixels) is a degenerate figure: refused before drawing


class FigureError(ConfigError):
    """A figure cannot be drawn: an artist of degenerate size, or drawing takes longer than ``DRAW_SECONDS``."""


def _check_extents(fig, path: Path) -> None:
    """FigureError when a circle, ellipse, arc or wedge of ``fig`` spans a non-finite or huge extent (a setting that
    made the figure degenerate: Agg spins for minutes on such a curve; straight paths, e.g. log-scale bars from 0,
    are clipped cheaply and pass)."""
    from matplotlib.patches import Ellipse, Wedge

    for ax in fig.axes:
        for artist in ax.patches:
            if not isinstance(artist, (Ellipse, Wedge)):
                continue
            box = artist.get_window_extent()
            size = max(abs(box.width), abs(box.height))
            if not np.isfinite(size) or size > MAX_EXTENT_PX:
                raise FigureError(f"{path}: the figure is degenerate ({type(artist).__name__} of {size:.3g} pixels, "
                                  f"at most {MAX_EXTENT_PX:g}): a setting makes it too large to draw")


def _savefig_bounded(fig, tmp: Path, dpi: int, path: Path, seconds: float) -> None:
    """``fig.savefig(tmp)`` in a forked process (Linux/macOS) stopped after ``seconds`` (FigureError naming ``path``);
    where fork is unavailable, in this process without a bound."""
    if not hasattr(os, "fork"):
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        return
    pid = os.fork()
    if pid == 0:   # the child draws and exits without running this process's exit handlers
        code = 1
        try:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise FigureError(f"{path}: drawing took more than {seconds:g} s; a setting makes the figure degenerate")
        time.sleep(0.02)
    if os.waitstatus_to_exitcode(status) != 0:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")   # the child's error, raised here


def save(fig, path, numbers: dict | None = None, dpi: int = 130, seconds: float | None = None) -> Path:
    """Save ``fig`` as PNG (atomically) and, if given, the numbers behind it as JSON beside it. A degenerate figure
    (an artist of non-finite or huge extent) is refused before drawing, and drawing is stopped after ``seconds``
    (default ``DRAW_SECONDS``): FigureError naming the file, no file left behind. Text that runs into other text
    is reported as an ``OverlapWarning`` naming the file (the tests turn it into an error)."""
    path = Path(path)
    try:
        _check_extents(fig, path)
        atomic_write(path, lambda tmp: _savefig_bounded(fig, tmp, dpi, path, DRAW_SECONDS if seconds is None
                                                        else seconds))
        for a, b in overlapping_text(fig):  # drawn within the bound just now: drawing again is quick
            warnings.warn(f"{path.name}: {a!r} overlaps {b!r}", OverlapWarning, stacklevel=2)
    finally:
        plt.close(fig)
    if numbers is not None:
        write_json(path.with_suffix(".json"), numbers)
    return path


def label_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinct RGB colours (n, 3): tab20 first, then a golden-ratio hue walk."""
    base = list(plt.get_cmap("tab20").colors)
    if n <= len(base):
        return np.array(base[:n])
    import colorsys
    out = base[:]
    h = (seed * 0.1) % 1.0
    while len(out) < n:
        h = (h + 0.618033988749895) % 1.0
        k = len(out)
        out.append(colorsys.hsv_to_rgb(h, 0.45 + 0.4 * ((k * 7) % 3) / 2, 0.7 + 0.25 * ((k * 5) % 2)))
    return np.array(out[:n])


def region_map(ax, labels: np.ndarray, extent, colors: np.ndarray | None = None, alpha: float = 0.55):
    """Draw an integer label raster (ny, nx), row 0 = lowest y, as flat colours without blending.

    ``extent`` = (xmin, xmax, ymin, ymax) as returned by ``common.infra.data.grid``. Labels must be 0..L-1.
    Returns the image artist.
    """
    labels = np.asarray(labels)
    n_labels = int(labels.max()) + 1 if labels.size else 1
    if colors is None:
        colors = label_colors(n_labels)
    cmap = ListedColormap(colors[:n_labels]) if n_labels > 1 else ListedColormap([colors[0], colors[0]])
    return ax.imshow(labels, origin="lower", extent=extent, cmap=cmap, vmin=-0.5, vmax=max(n_labels - 0.5, 0.5),
                     interpolation="nearest", alpha=alpha, aspect="auto")


def finish_map(ax, extent, title: str, title_size: float | None = None, label_size: float | None = None):
    """Finish a 2-D map panel: the view ``extent`` = (xmin, xmax, ymin, ymax), equal aspect, axes labelled
    x_1 and x_2, the title (font sizes: matplotlib's defaults unless given)."""
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    size = {} if label_size is None else {"fontsize": label_size}
    ax.set_xlabel("$x_1$", **size)
    ax.set_ylabel("$x_2$", **size)
    ax.set_title(title, **({} if title_size is None else {"fontsize": title_size}))


def curves(ax, series: dict, xlabel: str, ylabel: str, title: str | None = None, logy: bool = False,
           colors: dict | None = None):
    """Line plot of {label: (x, y)}; ``colors`` {label: colour} (default: matplotlib's cycle)."""
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label, marker="." if len(x) < 30 else None,
                color=None if colors is None else colors.get(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def grouped_bars(ax, groups: list, series: dict, ylabel: str, title: str | None = None,
                 errors: dict | None = None, logy: bool = False):
    """Bars: one group per entry of ``groups``, one bar per key of ``series`` ({label: values})."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for j, (label, vals) in enumerate(series.items()):
        err = None if errors is None else errors.get(label)
        ax.bar(x + (j - (n - 1) / 2) * width, vals, width, yerr=err, label=label, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(g) for g in groups], rotation=0)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def image_grid(images: np.ndarray, n_cols: int, shape=(28, 28), titles=None, row_labels=None,
               vmin=None, vmax=None, cmap="gray", cell: float = 1.0, suptitle: str | None = None):
    """A figure with ``images`` (m, prod(shape)) laid out in rows of ``n_cols``.

    With ``vmin``/``vmax`` every image shares one intensity scale; otherwise each filter is scaled
    symmetrically around 0 by its own largest |value| (``cmap`` should then be diverging).
    """
    images = np.asarray(images)
    m = images.shape[0]
    n_rows = int(np.ceil(m / n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= m:
            ax.axis("off")
            continue
        img = images[i].reshape(shape)
        if vmin is None:
            lim = float(np.abs(img).max()) or 1.0
            ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        else:
            ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
        if row_labels is not None and i % n_cols == 0:
            ax.set_ylabel(str(row_labels[i // n_cols]), fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig
