"""One self-contained HTML page of an evaluation: the scores per subject and method in tables sortable by
a click on a header, their distributions, and orthogonal views of every subject (source, target, each
prediction, its |error| and std maps). Images are embedded as base64 PNG and the CSS and JS are inline:
the page fetches nothing, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from lift3d.evaluation.figures import PLANE_NAMES, metric_distributions, orthogonal_views, png_bytes
from lift3d.evaluation.metrics import INTENSITY_RULE, METRICS, PLANE_METRICS, UNCERTAINTY_METRICS, summarize
from lift3d.evaluation.planes import ms_ssim_minimum_size
from lift3d.io.errors import Lift3dError
from lift3d.io.writing import write_text_atomic

REPORT_NAME = "report.html"
IDENTITY = ("subject", "method")
VOLUME_VIEWS = ("source", "target")  # row names of the views figure that a method may not take


@dataclass(frozen=True)
class SubjectViews:
    """What the report draws for one subject: volumes ``(n, h, w)`` (slice axis first) of the target and
    each method's prediction, optionally the source and each method's std map (``--samples K``).

    :param spacing: voxel size ``(slice, row, column)`` for true panel aspect.
    :param plane_names: column titles (the in-plane view, then the two through-plane views).
    """

    target: np.ndarray
    predictions: Mapping[str, np.ndarray]
    source: np.ndarray | None = None
    stds: Mapping[str, np.ndarray] = field(default_factory=dict)
    spacing: Sequence[float] | None = None
    plane_names: Sequence[str] = PLANE_NAMES

    def check(self, title: str) -> "SubjectViews":
        clash = sorted(set(self.predictions) & set(VOLUME_VIEWS))
        if clash:
            raise Lift3dError(f"a method may not be named {', '.join(clash)}: those rows show the volumes themselves")
        if not self.predictions:
            raise Lift3dError(f"views of '{title}' have no prediction; give at least one method -> volume")
        return self

    def figure_png(self, title: str) -> bytes:
        self.check(title)
        volumes = {**({} if self.source is None else {"source": self.source}), "target": self.target,
                   **self.predictions}
        fig = orthogonal_views(volumes, title=title, error_of=[(m, "target") for m in self.predictions],
                               uncertainty=dict(self.stds) or None, spacing=self.spacing,
                               plane_names=self.plane_names, dpi=80)
        return png_bytes(fig, dpi=80)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def score_columns(rows: Sequence[Mapping[str, object]]) -> dict[str, list[str]]:
    """The numeric columns of ``rows`` in three groups: ``volume`` (MAE, PSNR, SSIM, z_inconsistency, the
    std-map scores), ``planes`` (per plane, through-plane, MS-SSIM) and ``other`` (any other column whose
    values are all numbers or None, at least one a number, e.g. the ``dice_*`` of a segmenter)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    known = {*METRICS, *PLANE_METRICS, *UNCERTAINTY_METRICS}  # shown even where no row could be scored (n/a)
    numeric = [k for k in keys if k not in IDENTITY and all(_is_number(r.get(k)) or r.get(k) is None for r in rows)
               and (k in known or any(_is_number(r.get(k)) for r in rows))]
    volume = [k for k in (*METRICS, *UNCERTAINTY_METRICS) if k in numeric]
    planes = [k for k in PLANE_METRICS if k in numeric]
    return {"volume": volume, "planes": planes, "other": [k for k in numeric if k not in volume + planes]}


def _format(value: object) -> str:
    if value is None:
        return "n/a"
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        return str(number)
    return f"{number:.3g}" if abs(number) >= 1e5 or (number != 0 and abs(number) < 1e-4) else f"{number:.4f}"


def _sort_key(value: object) -> str:
    """A cell's ``data-v``: the number as JS ``Number()`` reads it; empty for a score not taken."""
    if value is None or math.isnan(float(value)):  # type: ignore[arg-type]
        return ""
    number = float(value)  # type: ignore[arg-type]
    return repr(number) if math.isfinite(number) else ("Infinity" if number > 0 else "-Infinity")


def _name_cell(name: str, directions: Mapping[str, bool | None], tag: str = "th") -> str:
    direction = directions.get(name)
    arrow = {True: " &uarr;", False: " &darr;"}.get(direction, "")  # type: ignore[arg-type]
    tip = {True: "higher is better", False: "lower is better"}.get(direction, "")  # type: ignore[arg-type]
    return f'<{tag} title="{tip}">{html.escape(name)}{arrow}</{tag}>'


def _score_table(rows: Sequence[Mapping[str, object]], names: list[str], identity: list[str],
                 directions: Mapping[str, bool | None], table_id: str) -> str:
    head = "".join(f"<th>{name}</th>" for name in identity) + "".join(_name_cell(n, directions) for n in names)
    body = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(str(row.get(name, '')))}</td>" for name in identity)
        cells += "".join(f'<td class="num" data-v="{_sort_key(row.get(n))}">{_format(row.get(n))}</td>' for n in names)
        body.append(f"<tr>{cells}</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _summary_table(rows: Sequence[Mapping[str, object]], names: list[str], methods: list[str],
                   directions: Mapping[str, bool | None]) -> str:
    """Metrics down, methods across: mean +/- population std (n); the best mean per metric in bold."""
    def scored(row: Mapping[str, object], name: str) -> object:
        value = row.get(name)
        return None if value is None or math.isnan(float(value)) else value  # type: ignore[arg-type]

    stats = {m: summarize([{n: scored(r, n) for n in names} for r in rows if str(r.get("method", "")) == m], names)
             for m in methods}
    head = "<th>metric</th>" + "".join(f"<th>{html.escape(m) if m else 'mean &plusmn; std (n)'}</th>" for m in methods)
    body = []
    for name in names:
        means = [stats[m][name]["mean"] for m in methods]
        finite = [v for v in means if not math.isnan(v)]
        best = None
        if len(methods) > 1 and finite and directions.get(name) is not None:
            best = max(finite) if directions[name] else min(finite)
        cells = []
        for method, mean in zip(methods, means):
            entry = stats[method][name]
            text = "n/a" if entry["n"] == 0 else f"{_format(mean)} &plusmn; {_format(entry['std'])} ({entry['n']})"
            cells.append(f"<td>{'<b>' + text + '</b>' if best is not None and mean == best else text}</td>")
        body.append(f"<tr>{_name_cell(name, directions, 'td')}{''.join(cells)}</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _view_png(subject: str, view: SubjectViews | str | os.PathLike | bytes) -> bytes | SubjectViews:
    """A view given as a PNG (path or bytes), read and checked; a ``SubjectViews`` checked, drawn later."""
    if isinstance(view, SubjectViews):
        return view.check(subject)
    if isinstance(view, bytes):
        png = view
    else:
        try:
            png = Path(view).read_bytes()
        except OSError as exc:
            raise Lift3dError(f"cannot read the views of '{subject}' from {view}: {exc.strerror or exc}") from None
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise Lift3dError(f"the views of '{subject}' are not a PNG image")
    return png


def _automatic_notes(rows: Sequence[Mapping[str, object]], names: list[str], given: Sequence[str]) -> list[str]:
    """A line for each column with scores not taken, unless a ``given`` note already starts with its name."""
    notes = []
    for name in names:
        missing = sum(row.get(name) is None for row in rows)
        if missing and not any(note.startswith(name) for note in given):
            why = (f": MS-SSIM needs every axis to be at least {ms_ssim_minimum_size()} voxels"
                   if name == "ms_ssim" else "")
            notes.append(f"{name}: not scored for {missing} of {len(rows)} rows (n/a){why}")
    return notes


def render_report(rows: Sequence[Mapping[str, object]], *,
                  views: Mapping[str, SubjectViews | str | os.PathLike | bytes] | None = None,
                  title: str = "lift3d evaluation", notes: Sequence[str] = (),
                  higher_is_better: Mapping[str, bool | None] | None = None) -> str:
    """The HTML text of ``write_report`` (same arguments, no path)."""
    rows = [dict(row) for row in rows]
    if not rows:
        raise Lift3dError("a report needs at least one row of scores; got none")
    unnamed = [i for i, row in enumerate(rows) if "subject" not in row]
    if unnamed:
        raise Lift3dError(f"every row needs a 'subject'; row {unnamed[0]} has keys {', '.join(map(str, rows[unnamed[0]]))}")
    groups = score_columns(rows)
    names = groups["volume"] + groups["planes"] + groups["other"]
    if not names:
        raise Lift3dError(f"the rows hold no numeric score; their keys: {', '.join(map(str, rows[0]))}")
    directions: dict[str, bool | None] = {**METRICS, **PLANE_METRICS, **UNCERTAINTY_METRICS, **(higher_is_better or {})}
    has_method = any("method" in row for row in rows)
    methods = list(dict.fromkeys(str(row.get("method", "")) for row in rows))
    identity = ["subject", "method"] if has_method else ["subject"]
    all_notes = [*notes, *_automatic_notes(rows, names, notes)]

    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len({str(r['subject']) for r in rows})} subjects, {len(methods)} method(s). "
             "Click a column header to sort; click again to reverse.</p>"]
    if all_notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in all_notes) + "</ul>")
    parts += ["<h2>Summary</h2>", _summary_table(rows, names, methods, directions)]
    sections = [("volume", "Volume scores"), ("planes", "Per-plane and through-plane scores"),
                ("other", "Downstream and other scores")]
    for key, heading in sections:
        if groups[key]:
            parts += [f'<h2 id="section-{key}">{heading}</h2>',
                      _score_table(rows, groups[key], identity, directions, f"table-{key}")]
    checked = {subject: _view_png(subject, view) for subject, view in (views or {}).items()}  # fail before drawing
    drawable = [n for n in names if any(r.get(n) is not None and math.isfinite(float(r[n])) for r in rows)]  # type: ignore[arg-type]
    if drawable:
        figure = metric_distributions(rows, drawable, higher_is_better=directions, dpi=80)
        parts += ['<h2 id="section-distributions">Distributions</h2>',
                  "<p>One box per method, one point per subject.</p>",
                  _image(png_bytes(figure, dpi=80), "distributions of the scores")]
    if checked:
        parts.append('<h2 id="section-views">Orthogonal views</h2>')
        for subject, view in checked.items():
            png = view.figure_png(subject) if isinstance(view, SubjectViews) else view
            parts.append(f'<figure id="views-{html.escape(subject)}">{_image(png, subject)}</figure>')
    parts.append(f'<p class="rule">Intensity scale of every score: {html.escape(INTENSITY_RULE)}. '
                 "Population std (ddof=0) over subjects.</p>")
    return _PAGE.format(title=html.escape(title), style=_STYLE, script=_SCRIPT, body="\n".join(parts))


def write_report(path: str | os.PathLike, rows: Sequence[Mapping[str, object]], *,
                 views: Mapping[str, SubjectViews | str | os.PathLike | bytes] | None = None,
                 title: str = "lift3d evaluation", notes: Sequence[str] = (),
                 higher_is_better: Mapping[str, bool | None] | None = None) -> Path:
    """Write one self-contained HTML report to ``path`` (atomically: nothing is left on failure).

    :param rows: one mapping per subject and method, with ``subject``, optionally ``method`` (several
        methods: one row each per subject) and scores; every numeric column is shown (None: not scored).
    :param views: subject -> ``SubjectViews`` to draw, or a PNG already drawn (a path or bytes), e.g.
        the ``figures/<subject>.png`` of ``lift3d-evaluate``.
    :param notes: lines shown at the top (why a score is missing); columns with None values add their own.
    :param higher_is_better: directions of columns lift3d does not know (``{"dice_wm": True}``).
    """
    text = render_report(rows, views=views, title=title, notes=notes, higher_is_better=higher_is_better)
    return write_text_atomic(path, text)  # no link followed, nothing half-written left


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<script>{script}</script>
</body></html>
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; }
th { background: #e8eef6; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #f6f6f6; }
ul.notes { background: #fff7e0; border: 1px solid #e0c060; padding: 0.5em 2em; }
img { max-width: 100%; height: auto; }
figure { margin: 0 0 1.5em; }
p.rule { color: #666; font-size: 0.8em; }
"""

# Sorting: numbers by data-v (empty = not scored, always last), other cells as text.
_SCRIPT = """
function lift3dSort(th) {
  const table = th.closest("table"), column = Array.from(th.parentNode.children).indexOf(th);
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  table.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  const body = table.tBodies[0], rows = Array.from(body.rows);
  const key = row => { const cell = row.cells[column];
    return cell.dataset.v === undefined ? cell.textContent : (cell.dataset.v === "" ? null : Number(cell.dataset.v)); };
  rows.sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    const order = typeof x === "number" ? (x < y ? -1 : x > y ? 1 : 0) : String(x).localeCompare(String(y));
    return ascending ? order : -order; });
  rows.forEach(row => body.appendChild(row));
}
document.querySelectorAll("table.sortable th").forEach(th => th.addEventListener("click", () => lift3dSort(th)));
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const decoded = images.filter(image => image.complete && image.naturalWidth > 0).length;
  document.body.dataset.imagesDecoded = decoded + "/" + images.length;
});
"""
