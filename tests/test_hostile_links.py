"""Nothing lift3d writes or reads follows a link or a side-file path out of its folder (issue 33, items 1-2).

Each test plants one kind of link where lift3d would write (the run lock, temporaries, ``std/``, the
figures, the report, the CSV logs) or one kind of side file that a header names (MetaImage's
``ElementDataFile``, NIfTI pairs), and checks what the check protects: the file outside is untouched,
the refusal is one line naming the path, and nothing is left behind. Also: temporary names fit any
name the file system allows, and a temporary whose PID field is no PID is stale, not a crash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lift3d.cli import evaluate as evaluate_cli  # noqa: E402
from lift3d.data.errors import VolumeError  # noqa: E402
from lift3d.data.metaimage import check_data_files  # noqa: E402
from lift3d.data.nifti import load_image  # noqa: E402
from lift3d.io.errors import UnsafePathError  # noqa: E402
from lift3d.io.writing import (LOCK_FILE, RunLock, atomic_path, clean_stale_temporaries, commit_together,  # noqa: E402
                               is_temporary, temporary_path, write_text_atomic)
from lift3d.training.tracking import CSVTracker, drop_rows_after  # noqa: E402

SHAPE = (10, 12, 8)


def volume(path: Path, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def everything(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def outside(tmp_path):
    """A folder lift3d must never write to, with a file and a sub-folder in it."""
    folder = tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    (folder / "precious.txt").write_text("keep me")
    (folder / "sub" / "also.txt").write_text("keep me too")
    return folder


def untouched(folder: Path) -> bool:
    return (everything(folder) == ["precious.txt", "sub", "sub/also.txt"]
            and (folder / "precious.txt").read_text() == "keep me"
            and (folder / "sub" / "also.txt").read_text() == "keep me too")


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- the run lock --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plant", ["symlink", "dangling symlink", "hard link", "fifo"])
def test_the_run_lock_never_writes_its_pid_into_another_file(tmp_path, outside, plant):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_FILE
    {"symlink": lambda: lock.symlink_to(outside / "precious.txt"),
     "dangling symlink": lambda: lock.symlink_to(outside / "created-by-lift3d.txt"),
     "hard link": lambda: os.link(outside / "precious.txt", lock),
     "fifo": lambda: os.mkfifo(lock)}[plant]()
    with pytest.raises(UnsafePathError) as info:
        RunLock(run).acquire()
    assert str(lock) in str(info.value) and "\n" not in str(info.value)
    assert untouched(outside)  # not truncated, no PID written, the dangling target not created
    lock.unlink()
    with RunLock(run):  # the folder itself stays usable once the plant is gone
        assert lock.read_text() == str(os.getpid())


# -- temporaries: any name fits, any PID field is safe, a link among them is removed itself -----------------


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127, "b" * 200 + ".nii.gz", "short"],
                         ids=["255-ascii", "254-bytes-utf8", "long-nifti", "short"])
def test_any_name_the_file_system_allows_can_be_written_atomically(tmp_path, name):
    final = tmp_path / name
    tmp = temporary_path(final, ".nii.gz")
    assert len(os.fsencode(tmp.name)) <= 255 and tmp.parent == tmp_path and is_temporary(tmp.name)
    write_text_atomic(final, "content")
    assert final.read_text() == "content" and everything(tmp_path) == [name]


def test_a_temporary_whose_pid_field_is_no_pid_is_stale_and_never_a_crash(tmp_path, outside):
    """A 23-digit PID once crashed every run into the folder (OverflowError); a link named like a
    stale temporary is removed, never what it points to; a stale folder is removed without following
    a link inside it."""
    run = tmp_path / "run"
    run.mkdir()
    stale = [f".a.lift3d-tmp-{pid}-0123456789ab" for pid in ("9" * 23, "0", str(2**31), str(2**63), dead_pid())]
    for name in stale:
        (run / name).write_text("half")
    (run / f".b.lift3d-tmp-{dead_pid()}-0123456789ab").symlink_to(outside / "precious.txt")
    (run / f".c.lift3d-tmp-{dead_pid()}-0123456789ab").symlink_to(outside)
    folder = run / f".d.lift3d-tmp-{'7' * 40}-0123456789ab"
    folder.mkdir()
    (folder / "inner").symlink_to(outside)
    alive = temporary_path(run / "e")  # this process's own: kept
    alive.write_text("mine")
    not_ours = ["keep.txt", ".a.lift3d-tmp-\u0661\u0662-0123456789ab"]  # non-ASCII digits are no lift3d PID field
    for name in not_ours:
        (run / name).write_text("x")
    removed = clean_stale_temporaries(run)
    assert len(removed) == len(stale) + 3
    assert everything(run) == sorted([alive.name, *not_ours])
    assert untouched(outside)


# -- files lift3d replaces: a link at the final path is refused, the target untouched -----------------------


def _figure(path):
    from matplotlib.figure import Figure

    from lift3d.evaluation.figures import save_png

    return save_png(Figure(figsize=(1, 1)), path)


def _report(path):
    from lift3d.evaluation.report import write_report

    return write_report(path, [{"subject": "a", "mae": 1.0}])


def _nifti(path):
    from lift3d.data.nifti import save_volume
    from lift3d.data.volume import TrainingGrid, prepare_volume

    array, meta = prepare_volume(load_image(volume(path.parent.parent / "src.nii.gz")), TrainingGrid(8, 8))
    return save_volume(path, array, meta)


def _atomic(path):
    with atomic_path(path) as tmp:
        tmp.write_text("new")


def _commit(path):
    tmp = temporary_path(path)
    tmp.write_text("new")
    try:
        commit_together([(tmp, path)])
    finally:  # the caller's temporary, as lift3d-synthesize removes its own
        tmp.unlink(missing_ok=True)


WRITERS = {"text": lambda p: write_text_atomic(p, "new"), "atomic_path": _atomic, "commit_together": _commit,
           "figure png": _figure, "report html": _report, "nifti volume": _nifti}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_link_where_a_file_is_replaced_is_refused(tmp_path, outside, writer):
    out = tmp_path / "out"
    out.mkdir()
    final = out / ("x.nii.gz" if writer == "nifti volume" else "x")
    final.symlink_to(outside / "precious.txt")
    with pytest.raises(UnsafePathError, match=f"{final} is a symbolic link; lift3d does not write through a link"):
        WRITERS[writer](final)
    assert untouched(outside) and everything(out) == ["x.nii.gz" if writer == "nifti volume" else "x"]


def test_commit_together_is_all_or_nothing(tmp_path, monkeypatch):
    """A failing rename puts every earlier file back; a link at any final path stops it before the first."""
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "old.png").write_text("old figure")
    (out / "metrics.csv").write_text("old csv")
    staged = {name: temporary_path(out / name) for name in ("figures", "metrics.csv", "summary.json")}
    staged["figures"].mkdir()
    (staged["figures"] / "new.png").write_text("new figure")
    staged["metrics.csv"].write_text("new csv")
    staged["summary.json"].write_text("new summary")
    real = os.replace

    def failing(src, dst):
        if str(dst).endswith("summary.json"):
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        commit_together([(staged[n], out / n) for n in staged])
    monkeypatch.setattr(os, "replace", real)
    kept = [p for p in everything(out) if not is_temporary(p.split("/")[0])]  # the staged ones are the caller's
    assert kept == ["figures", "figures/old.png", "metrics.csv"] and (out / "metrics.csv").read_text() == "old csv"


# -- output sub-folders: std/, figures/, report, CSV of lift3d-synthesize and lift3d-evaluate --------------


def refused_line(main, argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0], err
    return err[0]


def test_synthesize_refuses_a_std_folder_that_is_a_link(tmp_path, outside, capsys):
    import lift3d.cli.synthesize as synthesize_cli

    stale = outside / f".a_std.nii.gz.lift3d-tmp-{dead_pid()}-0123456789ab.nii.gz"  # the other folder's temporary
    stale.write_text("someone else's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "std").symlink_to(outside)
    source = volume(tmp_path / "a.nii.gz")
    line = refused_line(synthesize_cli.main, ["--model", tmp_path / "no-model", "--source", source, "--out", out,
                                              "--samples", 2], capsys)
    assert f"{out / 'std'} is a symbolic link" in line
    assert stale.exists()  # not cleaned: it is another folder's
    stale.unlink()
    assert untouched(outside)


@pytest.mark.parametrize("output", ["figures", "report.html", "metrics.csv", "summary.json"])
def test_evaluate_refuses_a_link_at_any_of_its_outputs_before_any_work(tmp_path, outside, capsys, output):
    pred = volume(tmp_path / "p.nii.gz", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / output).symlink_to(outside if output == "figures" else outside / "precious.txt")
    line = refused_line(evaluate_cli.main, ["--pred", pred, "--target", volume(tmp_path / "t.nii.gz"), "--report",
                                            "--out", out], capsys)
    assert f"{out / output} is a symbolic link" in line
    assert untouched(outside) and everything(out) == [output]  # no staging folder left


def test_the_training_log_refuses_links(tmp_path, outside):
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="logs is a symbolic link"):
        CSVTracker("logs", run)
    (run / "logs").unlink()
    (run / "logs").mkdir()
    log = run / "logs" / "metrics.csv"
    log.symlink_to(outside / "precious.txt")
    with pytest.raises(UnsafePathError, match="metrics.csv is a symbolic link"):
        CSVTracker("logs", run)
    with pytest.raises(UnsafePathError, match="metrics.csv is a symbolic link"):
        drop_rows_after(log, 3)  # a resumed run trims its log first
    log.unlink()
    os.link(outside / "precious.txt", log)  # a hard link: appending would change the other file
    with pytest.raises(UnsafePathError, match="2 hard links"):
        CSVTracker("logs", run)
    tracker = CSVTracker("logs", tmp_path / "other")
    os.link(outside / "precious.txt", tracker.path)  # planted after the tracker started: the append refuses it
    with pytest.raises(UnsafePathError, match="3 hard links"):
        tracker.log({"loss": 1.0}, step=1)
    assert untouched(outside)


# -- side files named by a header stay beside it ----------------------------------------------------------


MHD = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nDimSize = 4 5 6\n"
       "ElementSpacing = 1 1 1\nElementType = MET_SHORT\n")


@pytest.mark.parametrize("data_file, message", [
    ("../secret/outside.raw", "which leaves {folder} through '..'"),
    ("{secret}/outside.raw", "an absolute path; lift3d reads only files inside {folder}"),
    ("/etc/passwd", "an absolute path"),
    (r"C:\data\x.raw", "an absolute path"),
    ("link.raw", "resolves to {secret}/outside.raw, outside {folder}"),
    ("LIST", "LOCAL or one file name beside the header (not a list or a numbered pattern"),
    ("slice%03d.raw 1 6 1", "not a list or a numbered pattern"),
    ("elementdatafile-trick", "an absolute path"),
], ids=["parent", "absolute", "system", "windows", "link-out", "list", "pattern", "case-variant-key"])
def test_a_metaimage_data_file_outside_the_header_folder_is_refused(tmp_path, data_file, message):
    """Checked before SimpleITK is even imported, with the rule of lift3d's own JSON paths."""
    folder, secret = tmp_path / "in", tmp_path / "secret"
    folder.mkdir(), secret.mkdir()
    (secret / "outside.raw").write_bytes(b"\0" * 240)
    (folder / "link.raw").symlink_to(secret / "outside.raw")
    value = data_file.replace("{secret}", str(secret))
    header = folder / "x.mhd"
    if value == "elementdatafile-trick":  # a key ITK does not read, then the one it does
        header.write_text(MHD + "elementdatafile = LOCAL\nElementDataFile = /etc/passwd\n")
    else:
        header.write_text(MHD + f"ElementDataFile = {value}\n")
    with pytest.raises(VolumeError) as info:
        load_image(header)
    text = str(info.value)
    assert text.startswith(f"{header}: its ElementDataFile") and "\n" not in text
    assert message.format(folder=folder, secret=secret) in text


def test_a_metaimage_data_file_beside_the_header_passes_the_check(tmp_path):
    (tmp_path / "x.raw").write_bytes(b"\0" * 240)
    (tmp_path / "x.mhd").write_text(MHD + "ElementDataFile = x.raw\n")
    (tmp_path / "y.mha").write_bytes((MHD + "ElementDataFile = LOCAL\n").encode() + b"ElementDataFile = /etc/x\0")
    assert check_data_files(tmp_path / "x.mhd") == [tmp_path / "x.raw"]
    assert check_data_files(tmp_path / "y.mha") == []  # what follows LOCAL is voxels, not header


@pytest.mark.parametrize("name", ["x.hdr", "x.img", "x.hdr.gz", "x.nii"])
def test_nifti_pairs_whose_header_names_a_second_file_are_refused(tmp_path, outside, capsys, name):
    """A pair's .img could be a link out of the folder: the format is refused, with what lift3d reads."""
    pair = nib.Nifti1Pair(np.zeros((4, 5, 6), np.float32), np.eye(4))
    nib.save(pair, tmp_path / "x.hdr")
    (tmp_path / "x.img").unlink()
    (tmp_path / "x.img").symlink_to(outside / "precious.txt")
    if name == "x.hdr.gz":
        (tmp_path / name).write_bytes(b"")
    if name == "x.nii":  # a pair's header under a single file's name
        (tmp_path / name).write_bytes((tmp_path / "x.hdr").read_bytes())
    with pytest.raises(VolumeError) as info:
        load_image(tmp_path / name)
    assert str(info.value).startswith(str(tmp_path / name))
    assert "lift3d reads single-file NIfTI (.nii.gz, .nii) and MetaImage" in str(info.value)
    line = refused_line(evaluate_cli.main, ["--pred", tmp_path / name, "--target", volume(tmp_path / "t.nii.gz"),
                                            "--out", tmp_path / "out"], capsys)
    assert "lift3d reads single-file NIfTI" in line
    assert untouched(outside) and not (tmp_path / "out").exists()

