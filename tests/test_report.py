"""Tests for lift3d/evaluation/report.py: one self-contained HTML page of scores, distributions and views,
written atomically; rendered in a real headless browser (Debian's chromium) where one is installed."""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess

import numpy as np
import pytest

from lift3d.evaluation.planes import evaluate_all
from lift3d.evaluation.report import SubjectViews, render_report, score_columns, write_report
from lift3d.io.errors import Lift3dError

SHAPE = (8, 16, 16)  # (n, h, w): tiny, as every test here


def phantom(seed: int) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in SHAPE), indexing="ij")
    return np.exp(-2 * (x**2 + y**2 + z**2)) + 0.4 * (x > 0.3) + 0.02 * np.random.default_rng(seed).random(SHAPE)


def two_methods(subjects=("sub-01", "sub-02")):
    """Rows of two methods (lifted: small noise; slice-wise: an offset per slice) with a dice column, and views."""
    rng = np.random.default_rng(0)
    rows, views = [], {}
    for index, subject in enumerate(subjects):
        target = phantom(index)
        predictions = {"lifted": target + rng.normal(0, 0.02, SHAPE),
                       "slice-wise": target + rng.normal(0, 0.08, (SHAPE[0], 1, 1))}
        for method, pred in predictions.items():
            rows.append({"subject": subject, "method": method, **evaluate_all(pred, target),
                         "dice_wm": 0.9 if method == "lifted" else 0.7, "prediction": f"{subject}_{method}.nii.gz"})
        views[subject] = SubjectViews(target=target, predictions=predictions, source=1.5 - target,
                                      stds={"lifted": np.abs(rng.normal(0, 0.02, SHAPE))})
    return rows, views


def table_rows(page: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_columns_fall_into_volume_plane_and_downstream_groups():
    rows, _ = two_methods()
    groups = score_columns(rows)
    assert groups["volume"] == ["mae", "psnr", "ssim", "z_inconsistency"]
    assert groups["planes"][:3] == ["psnr_axial", "psnr_coronal", "psnr_sagittal"] and "ms_ssim" in groups["planes"]
    assert groups["other"] == ["dice_wm"]  # any other numeric column; the file path is not one


def test_the_page_holds_every_table_the_images_and_nothing_from_the_network():
    rows, views = two_methods()
    page = render_report(rows, views=views, title="two <methods>", higher_is_better={"dice_wm": True})
    assert "<title>two &lt;methods&gt;</title>" in page  # escaped
    for section in ("section-volume", "section-planes", "section-other", "section-distributions", "section-views"):
        assert f'id="{section}"' in page
    # 4 rows per table (2 subjects x 2 methods), subject and method first
    assert [r[:2] for r in table_rows(page, "table-planes")] == [
        ["sub-01", "lifted"], ["sub-01", "slice-wise"], ["sub-02", "lifted"], ["sub-02", "slice-wise"]]
    dice = [r[2] for r in table_rows(page, "table-other")]
    assert dice == ["0.9000", "0.7000", "0.9000", "0.7000"]
    # ms_ssim of an 8 x 16 x 16 volume is not taken: n/a in the table, and a note says why
    assert all(r[-1] == "n/a" for r in table_rows(page, "table-planes"))
    assert re.search(r'<ul class="notes"><li>ms_ssim: not scored for 4 of 4 rows \(n/a\): MS-SSIM needs every axis '
                     r"to be at least 176 voxels</li>", page)
    # the summary puts the better method's mean in bold, by each metric's direction
    summary = {r[0]: r[1:] for r in table_rows(page, "summary")}
    assert summary[next(k for k in summary if k.startswith("mae"))][0].startswith("<b>")  # lifted: lower MAE
    assert summary[next(k for k in summary if k.startswith("dice_wm"))][0].startswith("<b>")
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', page)
    assert [alt for alt, _ in images] == ["distributions of the scores", "sub-01", "sub-02"]
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in images)
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<link" not in page and "@import" not in page


def test_one_method_and_views_given_as_png_files(tmp_path):
    rows = [{"subject": s, "mae": m, "psnr": p} for s, m, p in (("a", 2.0, 30.0), ("b", 4.0, float("inf")))]
    png = tmp_path / "a.png"
    from matplotlib.figure import Figure

    Figure(figsize=(1, 1)).savefig(png)
    page = render_report(rows, views={"a": png})
    assert [r for r in table_rows(page, "table-volume")] == [["a", "2.0000", "30.0000"], ["b", "4.0000", "inf"]]
    assert 'data-v="Infinity"' in page and "section-other" not in page and "section-planes" not in page
    assert "psnr (1 not drawn)" not in page  # the panel title is inside the PNG, not the page
    assert page.count("<img") == 2


def test_write_report_is_atomic_and_refuses_bad_input_in_one_line(tmp_path):
    rows, views = two_methods(("sub-01",))
    path = tmp_path / "report.html"
    path.write_text("the previous report")
    bad_views = {"sub-01": tmp_path / "missing.png"}
    with pytest.raises(Lift3dError, match=r"cannot read the views of 'sub-01' from .*missing\.png"):
        write_report(path, rows, views=bad_views)
    assert path.read_text() == "the previous report" and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    clash = {"sub-01": SubjectViews(target=phantom(0), predictions={"target": phantom(1)})}
    with pytest.raises(Lift3dError, match="a method may not be named target"):
        write_report(path, rows, views=clash)
    with pytest.raises(Lift3dError, match="at least one row"):
        write_report(path, [])
    with pytest.raises(Lift3dError, match="every row needs a 'subject'; row 0 has keys mae"):
        write_report(path, [{"mae": 1.0}])
    with pytest.raises(Lift3dError, match="no numeric score"):
        write_report(path, [{"subject": "a", "note": "x"}])
    assert write_report(path, rows, views=views) == path
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no temporary left


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(report, *args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", *args, report.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None, reason="no chromium or chromium-browser on PATH (apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser(tmp_path):
    from matplotlib.image import imread

    rows, views = two_methods()
    report = write_report(tmp_path / "report.html", rows, views=views, title="browser test")

    # The DOM after the page's own script ran, with a click on the psnr header of the volume table twice
    # (descending), as a reader would: every embedded image decoded (naturalWidth > 0), the rows sorted.
    clicked = tmp_path / "clicked.html"
    click = ('<script>const th = Array.from(document.querySelectorAll("#table-volume th"))'
             '.find(h => h.textContent.startsWith("psnr")); th.click(); th.click();</script></body>')
    clicked.write_text(report.read_text().replace("</body>", click))
    dom = _browse(clicked, "--dump-dom").stdout
    assert 'data-images-decoded="3/3"' in dom, dom[:500]
    body = re.search(r'id="table-volume".*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    psnr = [float(v) for v in re.findall(r'<td class="num" data-v="([^"]+)">', body)[1::4]]  # mae, psnr, ssim, z
    assert len(psnr) == 4 and psnr == sorted(psnr, reverse=True)
    assert [html.unescape(m) for m in re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>", body)][:2] == ["lifted", "lifted"]
    assert re.search(r'<th[^>]*aria-sort="descending"[^>]*>psnr', dom)

    # The screenshot: a white page with dark text at the top left, and colour (the error maps, the plots) below.
    shot = tmp_path / "shot.png"
    run = _browse(report, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars")
    assert shot.is_file(), run.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert np.all(pixels[5, :, :] > 0.95)  # background: white
    title = pixels[10:70, 10:500]  # the <h1>
    assert (title.mean(axis=2) < 0.3).mean() > 0.02
    table = pixels[150:500, 10:700]  # the summary table: text and cell borders
    assert 0.02 < (table.mean(axis=2) < 0.6).mean() < 0.5
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.3  # matplotlib's blue/orange points, hot error maps
    assert colourful[700:].mean() > 1e-4
    assert (pixels.mean(axis=2) < 0.99).mean() > 0.05  # far from blank
