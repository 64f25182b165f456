"""Orthogonal mid-plane figures of synthesized volumes, like Make-A-Volume's Fig. 3 (MICCAI 2023):
the two through-plane views are where slice-by-slice synthesis shows its striping.

Volumes are ``(n, h, w)`` with the slice axis first, as ``lift3d.data.orientation.to_slices``
makes them. Panels per row: in-plane ``v[n // 2]`` (h vertical), then ``v[:, h // 2, :]`` and
``v[:, :, w // 2]`` with the slice axis vertical; every panel is drawn with index 0 at the bottom
left (``origin="lower"``). For axial slices of a canonical (RAS) image that is axial (anterior up),
coronal and sagittal (superior up), with the patient's right on the right.

Below the volumes come ``|error|`` rows and, for predictions that are the mean of several samples,
rows of their per-voxel standard deviation (the uncertainty map of
``lift3d.sampling.synthesis.synthesize_posterior``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lift3d.evaluation.metrics import DATA_RANGE, scale_to_target_range
from lift3d.io.writing import atomic_path, open_new

PLANE_NAMES = ("axial", "coronal", "sagittal")
# Grey levels clip the rarest 0.5 % at each end so a few bright voxels do not darken the panel.
DISPLAY_PERCENTILES = (0.5, 99.5)
PANEL_INCHES = 2.4
ERROR_CMAP, STD_CMAP = "hot", "viridis"


def _mid_planes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, h, w = volume.shape
    return volume[n // 2], volume[:, h // 2, :], volume[:, :, w // 2]


def _error_pairs(
    error_of: tuple[str, str] | Sequence[tuple[str, str]] | None, names: Sequence[str]
) -> list[tuple[str, str]]:
    if error_of is None:
        return []
    if len(error_of) == 2 and all(isinstance(item, str) for item in error_of):
        pairs = [tuple(error_of)]
    else:
        pairs = [tuple(pair) for pair in error_of]  # type: ignore[union-attr]
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(item, str) for item in pair):
            raise TypeError(f"error_of must be a (prediction, target) pair of names or a list of them; got {error_of!r}")
        for name in pair:
            if name not in names:
                raise ValueError(
                    f"error_of names '{name}', which is not in volumes; available: {', '.join(names)} "
                    "(pass error_of=None for no error rows)"
                )
    return pairs  # type: ignore[return-value]


def _uncertainty_rows(
    uncertainty: Mapping[str, np.ndarray] | None, arrays: Mapping[str, np.ndarray], pairs: list[tuple[str, str]]
) -> tuple[dict[str, np.ndarray], str]:
    """``std(name)`` -> the std map on the metrics' [0, 255] scale where ``name`` has a target in
    ``pairs`` (the scale of the error rows), else in its own units; and the colourbar label."""
    if not uncertainty:
        return {}, ""
    targets = dict(reversed(pairs))  # the first pair naming a prediction wins, as for grey levels
    rows, scaled = {}, []
    for name, std in uncertainty.items():
        if name not in arrays:
            raise ValueError(f"uncertainty names '{name}', which is not in volumes; available: {', '.join(arrays)}")
        std = np.asarray(std, dtype=np.float64)
        if std.shape != arrays[name].shape:
            raise ValueError(f"the std map of '{name}' has shape {std.shape} but '{name}' has {arrays[name].shape}; "
                             "they must match")
        if name in targets:
            target = arrays[targets[name]]
            lo, hi = float(target.min()), float(target.max())
            std = std * (DATA_RANGE / (hi - lo)) if hi > lo else std
        scaled.append(name in targets)
        rows[f"std({name})"] = std
    label = "std, 0-255 scale" if all(scaled) else "std" if not any(scaled) else "std (0-255 where paired)"
    return rows, label


def _display_range(volume: np.ndarray) -> tuple[float, float]:
    lo, hi = (float(v) for v in np.percentile(volume, DISPLAY_PERCENTILES))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def save_orthogonal_views(path: str | os.PathLike, volumes: Mapping[str, np.ndarray], *, dpi: int = 100,
                          **options: Any) -> Figure:
    """Write ``orthogonal_views`` (``options``: its ``title``, ``error_of``, ``uncertainty``, ``spacing``,
    ``plane_names``) as a PNG at ``path`` and return the figure.

    The file is written to a temporary name in the same folder, then renamed over ``path``.
    """
    fig = orthogonal_views(volumes, dpi=dpi, **options)
    save_png(fig, path, dpi=dpi)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG: to a temporary name in the same folder, then renamed over ``path``."""
    path = Path(path)
    # lift3d's temporary (short, recognisable, cleaned if a run dies), opened without following a link;
    # a link at ``path`` itself is refused.
    with atomic_path(path) as tmp, open_new(tmp, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return path


def png_bytes(fig: Figure, *, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes, e.g. to embed in an HTML page."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def orthogonal_views(
    volumes: Mapping[str, np.ndarray],
    *,
    title: str | None = None,
    error_of: tuple[str, str] | Sequence[tuple[str, str]] | None = ("prediction", "target"),
    uncertainty: Mapping[str, np.ndarray] | None = None,
    spacing: Sequence[float] | None = None,
    plane_names: Sequence[str] = PLANE_NAMES,
    dpi: int = 100,
) -> Figure:
    """A figure with one row per volume, one ``|error|`` row per ``error_of`` pair, then one
    ``std`` row per ``uncertainty`` map; ``save_orthogonal_views`` writes it as a PNG.

    :param volumes: name -> ``(n, h, w)`` array, all the same shape; rows follow this order.
    :param error_of: a ``(prediction, target)`` pair of names in ``volumes``, a list of such
        pairs (one per method), or None. Each prediction is drawn with its target's grey levels;
        other rows (a source modality) get their own. The error is ``|pred - target|`` on the
        metrics' [0, 255] scale (``lift3d.evaluation.metrics.scale_to_target_range``), hot colormap,
        one colour scale shared by all error rows, with a colourbar.
    :param uncertainty: prediction name (in ``volumes``) -> its per-voxel standard deviation
        ``(n, h, w)`` over samples. Drawn as ``std(name)`` rows (viridis, one colour scale shared by
        all of them, with a colourbar), on the same [0, 255] scale as the error rows where the
        prediction is in an ``error_of`` pair (std x 255 / the target's range), else in its units.
    :param spacing: voxel size ``(slice, row, column)``, e.g. in mm, for true panel aspect.
    :param plane_names: column titles for the in-plane view and the two through-plane views.
    :returns: the figure (three image axes per row, plus one colourbar axes per error or std row).
    """
    arrays, spacing = _checked_volumes(volumes, spacing, plane_names)
    pairs = _error_pairs(error_of, list(arrays))
    rows = _figure_rows(arrays, pairs, uncertainty)
    return _draw_rows(rows, next(iter(arrays.values())).shape, spacing, plane_names, title, dpi)


def _checked_volumes(
    volumes: Mapping[str, np.ndarray], spacing: Sequence[float] | None, plane_names: Sequence[str]
) -> tuple[dict[str, np.ndarray], tuple[float, ...]]:
    """The volumes as float arrays of one 3D shape, and the voxel spacing (1 mm when not given)."""
    names = list(volumes)
    if not names:
        raise ValueError("volumes is empty; give at least one name -> (n, h, w) array")
    arrays = {name: np.asarray(volumes[name], dtype=np.float64) for name in names}
    shape = arrays[names[0]].shape
    for name, array in arrays.items():
        if array.ndim != 3:
            raise ValueError(f"volume '{name}' must be 3D (n, h, w); got shape {array.shape}")
        if array.shape != shape:
            raise ValueError(f"volume '{name}' has shape {array.shape} but '{names[0]}' has {shape}; all must match")
    if spacing is None:
        spacing = (1.0, 1.0, 1.0)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive voxel sizes (slice, row, column); got {spacing}")
    if len(plane_names) != 3:
        raise ValueError(f"plane_names must name 3 columns; got {list(plane_names)}")
    return arrays, spacing


def _figure_rows(
    arrays: Mapping[str, np.ndarray], pairs: list[tuple[str, str]], uncertainty: Mapping[str, np.ndarray] | None
) -> list[tuple[str, np.ndarray, str, tuple[float, float], str | None]]:
    """``(label, volume, colormap, (vmin, vmax), colourbar label or None)`` per figure row: the volumes,
    then the error rows, then the std rows."""
    grey_range = {name: _display_range(array) for name, array in arrays.items()}
    for prediction, target in reversed(pairs):  # the first pair naming a prediction wins
        grey_range[target] = _display_range(arrays[target])
        grey_range[prediction] = grey_range[target]
    errors = {}
    for prediction, target in pairs:
        pred_scaled, target_scaled = scale_to_target_range(arrays[prediction], arrays[target])
        errors[f"|{prediction} - {target}|"] = np.abs(pred_scaled - target_scaled)
    error_max = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=0.0)
    error_max = error_max if error_max > 0 else DATA_RANGE / 100
    stds, std_label = _uncertainty_rows(uncertainty, arrays, pairs)
    std_max = max((float(np.percentile(std, 99.5)) for std in stds.values()), default=0.0)
    std_max = std_max if std_max > 0 else max((float(std.max()) for std in stds.values()), default=0.0) or 1.0

    rows = [(name, arrays[name], "gray", grey_range[name], None) for name in arrays]
    rows += [(name, error, ERROR_CMAP, (0.0, error_max), "0-255 scale") for name, error in errors.items()]
    rows += [(name, std, STD_CMAP, (0.0, std_max), std_label) for name, std in stds.items()]
    return rows


def _draw_rows(
    rows: list[tuple[str, np.ndarray, str, tuple[float, float], str | None]],
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    plane_names: Sequence[str],
    title: str | None,
    dpi: int,
) -> Figure:
    s_slice, s_row, s_col = spacing
    # imshow aspect = height / width of one pixel.
    aspects = (s_row / s_col, s_slice / s_col, s_slice / s_row)
    # Size columns by the panels' physical widths so a thin through-plane view wastes no space.
    n, h, w = shape
    row_height = max(h * s_row, n * s_slice)
    widths = [max(0.25, width / row_height) for width in (w * s_col, w * s_col, h * s_row)]
    figsize = (PANEL_INCHES * sum(widths) + 1.4, PANEL_INCHES * len(rows) + (0.5 if title else 0.3))
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    # A narrow fourth column holds the error and std colourbars, so every row's panels line up.
    grid = fig.add_gridspec(len(rows), 4, width_ratios=(*widths, 0.08))
    for row_index, (name, volume, cmap, (vmin, vmax), bar_label) in enumerate(rows):
        image = None
        for column, plane in enumerate(_mid_planes(volume)):
            ax = fig.add_subplot(grid[row_index, column])
            image = ax.imshow(plane, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower",
                              aspect=aspects[column], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row_index == 0:
                ax.set_title(plane_names[column])
            if column == 0:
                ax.set_ylabel(name)
        if bar_label is not None:
            colourbar = fig.colorbar(image, cax=fig.add_subplot(grid[row_index, 3]))
            colourbar.set_label(bar_label, fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def metric_distributions(
    rows: Sequence[Mapping[str, object]],
    names: Sequence[str],
    *,
    higher_is_better: Mapping[str, bool | None] | None = None,
    columns: int = 4,
    dpi: int = 100,
) -> Figure:
    """One small panel per metric in ``names``: a box plot per method (a row's ``method``, one box if no row
    has one) with every subject drawn as a point over it. Values that are None (not scored) or not finite
    (a perfect PSNR) cannot be drawn; a panel's title counts those it leaves out.

    :param higher_is_better: metric -> its better direction, shown as an arrow in the panel's title.
    """
    if not rows or not names:
        raise ValueError(f"metric_distributions needs rows and metric names; got {len(rows)} rows and names {list(names)}")
    methods = list(dict.fromkeys(str(row.get("method", "")) for row in rows))
    directions = higher_is_better or {}
    columns = max(1, min(columns, len(names)))
    lines = -(-len(names) // columns)
    width = max(2.6, 0.7 * len(methods) + 1.2)
    fig = Figure(figsize=(width * columns, 2.4 * lines), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    jitter = np.random.default_rng(0)  # fixed, so the same rows draw the same figure
    for index, name in enumerate(names):
        ax = fig.add_subplot(lines, columns, index + 1)
        groups, left_out = [], 0
        for method in methods:
            values = [row.get(name) for row in rows if str(row.get("method", "")) == method]
            finite = [float(v) for v in values if v is not None and np.isfinite(float(v))]  # type: ignore[arg-type]
            left_out += len(values) - len(finite)
            groups.append(finite)
        positions = [i + 1 for i, group in enumerate(groups) if group]
        if positions:
            ax.boxplot([g for g in groups if g], positions=positions, widths=0.5, showfliers=False)
        for position, group in enumerate(groups, start=1):
            ax.scatter(position + jitter.uniform(-0.12, 0.12, len(group)), group, s=12, alpha=0.8, zorder=3)
        ax.set_xticks(range(1, len(methods) + 1), [m or "prediction" for m in methods], fontsize="small")
        arrow = {True: " \u2191", False: " \u2193"}.get(directions.get(name), "")  # type: ignore[arg-type]
        ax.set_title(name + arrow + (f" ({left_out} not drawn)" if left_out else ""), fontsize="small")
        ax.tick_params(axis="y", labelsize="small")
    return fig
