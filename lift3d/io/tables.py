"""CSV files safe to open in a spreadsheet: a text cell that starts like a formula is neutralised.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and tab or
carriage return can hide such a start), so a subject named ``=HYPERLINK(...)`` by its file name would
run when ``metrics.csv`` is opened. OWASP's rule (CSV injection): prefix such a cell with a single
quote, which the spreadsheet shows as text. Only text is touched: numbers (``-0.5``) stay numbers.
"""

from __future__ import annotations

import csv
from typing import IO, Iterable, Mapping, Sequence

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """``value``, or ``"'" + value`` for text that a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Mapping[str, object]) -> dict[str, object]:
    """``row`` with every text cell passed through ``spreadsheet_safe`` (keys included)."""
    return {str(spreadsheet_safe(key)): spreadsheet_safe(value) for key, value in row.items()}


def write_rows(handle: IO[str], columns: Sequence[str], rows: Iterable[Mapping[str, object]], *,
               header: bool = True, neutralise: bool = True) -> None:
    """Write ``rows`` (missing keys empty, extra keys ignored) under ``columns`` as CSV, each text cell
    made safe unless ``neutralise`` is False (rows read back from a file lift3d already wrote safely)."""
    safe = [str(spreadsheet_safe(c)) for c in columns] if neutralise else list(columns)
    writer = csv.writer(handle)
    if header:
        writer.writerow(safe)
    for row in rows:
        cells = (row.get(column) for column in columns)
        writer.writerow(["" if v is None else (spreadsheet_safe(v) if neutralise else v) for v in cells])
