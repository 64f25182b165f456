"""What lift3d-synthesize and lift3d-evaluate write, against careless and hostile use (issue 21): no
output replaces an input or another output, a mean is never left without its std map, temporaries a
killed run left are removed and never read, and sizes and options are refused in one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import nibabel as nib
import pytest
from test_cli_synthesize import model_folder, write_source  # noqa: F401 (model_folder: a fixture)
from test_hostile_volumes import VALID, with_fields

import lift3d.cli.synthesize as synthesize_cli
from lift3d.cli.evaluate import main as evaluate
from lift3d.cli.synthesize import OUTPUT_SUFFIX, STD_DIR, STD_SUFFIX
from lift3d.io.budget import ENV
from lift3d.io.writing import is_temporary

pytestmark = pytest.mark.usefixtures("one_thread")


def synthesize(argv, capsys):
    code = synthesize_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv, capsys, message, main=synthesize_cli.main):
    """``main(argv)`` exits 2 with one error line holding ``message``; the line is returned."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error: " in lines[0], err
    assert message in lines[0], lines[0]
    return lines[0]


def argparse_refused(argv, capsys, message):
    with pytest.raises(SystemExit) as info:
        synthesize_cli.main([str(a) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    return errors[0]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def everything(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    write_source(folder / "a.nii.gz")
    return folder


# -- no output replaces an input, and no two outputs share a name -------------------------------------------


def test_out_set_to_the_source_folder_is_refused_before_any_work(tmp_path, sources, capsys):
    before = (sources / "a.nii.gz").read_bytes()
    for source in (sources, sources / "a.nii.gz"):  # a folder of sources, or a source file in it
        line = refused(["--model", tmp_path / "no-model", "--source", source, "--out", sources], capsys,
                       f"--out {sources} is the folder of the sources")
        assert "choose another --out folder" in line
    assert everything(sources) == ["a.nii.gz"] and (sources / "a.nii.gz").read_bytes() == before


def test_an_output_that_would_replace_a_source_is_refused(tmp_path, sources, capsys):
    out = tmp_path / "out"
    (out / STD_DIR).mkdir(parents=True)
    victim = write_source(out / STD_DIR / f"a{STD_SUFFIX}")  # where a.nii.gz's std map would go
    refused(["--model", tmp_path / "no-model", "--source", victim, sources / "a.nii.gz", "--out", out, "--samples", 3],
            capsys, f"writing {victim} would replace the source {victim}")


def test_sources_whose_outputs_collide_are_refused_naming_both(tmp_path, sources, capsys):
    write_source(sources / "a.nii")
    line = refused(["--model", tmp_path / "no-model", "--source", sources, "--out", tmp_path / "out"], capsys,
                   f"sources {sources / 'a.nii'} and {sources / 'a.nii.gz'} would both be written as a{OUTPUT_SUFFIX}")
    assert "rename one" in line and not (tmp_path / "out").exists()


def test_earlier_outputs_in_a_source_folder_are_not_synthesised_again(model_folder, tmp_path, sources, capsys):
    write_source(sources / f"a{OUTPUT_SUFFIX}", seed=3)  # an earlier run's output, kept beside its source
    code, stdout, stderr = synthesize(["--model", model_folder, "--source", sources, "--out", tmp_path / "out",
                                       "--steps", 2], capsys)
    assert code == 0, stderr
    assert everything(tmp_path / "out") == [f"a{OUTPUT_SUFFIX}"]  # no a_synth_synth.nii.gz
    assert f"skipping 1 earlier output(s) in {sources} (a{OUTPUT_SUFFIX})" in stdout


# -- temporaries: recognisable, removed at the next start, never read -----------------------------------------


def test_temporaries_of_a_killed_run_are_removed_and_none_is_left(model_folder, tmp_path, sources, capsys):
    out = tmp_path / "out"
    (out / STD_DIR).mkdir(parents=True)
    pid = dead_pid()
    stale = [out / f".a{OUTPUT_SUFFIX}.lift3d-tmp-{pid}-0123456789ab.nii.gz",
             out / STD_DIR / f".a{STD_SUFFIX}.lift3d-tmp-{pid}-0123456789ab.nii.gz"]
    for path in stale:
        path.write_bytes(b"half a volume")
    code, _, stderr = synthesize(["--model", model_folder, "--source", sources, "--out", out, "--steps", 2,
                                  "--samples", 2, "--scheduler", "ddpm"], capsys)
    assert code == 0, stderr
    assert everything(out) == [f"a{OUTPUT_SUFFIX}", STD_DIR, f"{STD_DIR}/a{STD_SUFFIX}"]


def test_save_volume_writes_under_a_recognisable_temporary_name(tmp_path, monkeypatch):
    from lift3d.data import nifti
    from lift3d.data.volume import TrainingGrid, prepare_volume

    array, meta = prepare_volume(nifti.load_image(write_source(tmp_path / "a.nii.gz")), TrainingGrid(16, 8))
    seen = []
    real_save = nib.save
    monkeypatch.setattr(nib, "save", lambda image, name: (seen.append(name), real_save(image, name)))
    nifti.save_volume(tmp_path / "out" / "b.nii.gz", array, meta)
    name = seen[0].rsplit("/", 1)[-1]
    assert name.startswith(".b.nii.gz.") and name.endswith(".nii.gz") and is_temporary(name)
    assert everything(tmp_path / "out") == ["b.nii.gz"]


def test_evaluate_skips_hidden_partial_files_in_its_folders(tmp_path, capsys):
    pred, target, out = tmp_path / "pred", tmp_path / "target", tmp_path / "out"
    for folder in (pred, target):
        folder.mkdir()
        write_source(folder / "a.nii.gz")
    (pred / f".a{OUTPUT_SUFFIX}.lift3d-tmp-{dead_pid()}-0123456789ab.nii.gz").write_bytes(b"partial")
    (pred / f".a{OUTPUT_SUFFIX}.4242.0123456789ab.nii.gz").write_bytes(b"partial")  # an older lift3d's temporary
    stale_staging = out / f".evaluation.lift3d-tmp-{dead_pid()}-0123456789ab"
    stale_staging.mkdir(parents=True)
    assert evaluate(["--pred", str(pred), "--target", str(target), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "1 subjects" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "summary.json"]


# -- the mean and its std map are committed together ------------------------------------------------------


def test_a_failure_writing_the_std_map_leaves_neither_it_nor_the_mean(model_folder, tmp_path, sources, capsys,
                                                                       monkeypatch):
    def full_disk(path, std, meta):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a std map")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthesize_cli, "save_std_volume", full_disk)
    out = tmp_path / "out"
    refused(["--model", model_folder, "--source", sources, "--out", out, "--steps", 2, "--samples", 2], capsys,
            f"cannot write {out / ('a' + OUTPUT_SUFFIX)}: No space left on device; nothing partial was left behind")
    assert not any(p.is_file() for p in out.rglob("*"))  # no mean without its std, and no temporary


def test_the_std_map_is_committed_before_its_mean_and_a_stale_one_is_removed(model_folder, tmp_path, sources,
                                                                             capsys, monkeypatch):
    commits = []
    real_commit = synthesize_cli.commit_together
    monkeypatch.setattr(synthesize_cli, "commit_together",
                        lambda pairs: (commits.append([final for _, final in pairs]), real_commit(pairs)))
    out = tmp_path / "out"
    mean, std = out / f"a{OUTPUT_SUFFIX}", out / STD_DIR / f"a{STD_SUFFIX}"
    argv = ["--model", model_folder, "--source", sources, "--out", out, "--steps", 2]
    assert synthesize(argv + ["--samples", 2], capsys)[0] == 0
    assert commits == [[std, mean]] and mean.is_file() and std.is_file()
    # One sample has no std map: the earlier one no longer describes the new mean.
    assert synthesize(argv, capsys)[0] == 0
    assert commits[-1] == [mean] and mean.is_file() and not std.exists()


# -- sizes and options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (["--num-slices", "100000000"], "--num-slices 100000000: a training grid of 100000000 x 16 x 16 float32 voxels"),
    (["--size", "1000000"], "--size 1000000x1000000: a training grid of 8 x 1000000 x 1000000 float32 voxels"),
    (["--num-slices", "300", "--size", "64", "--samples", "8"],
     "--num-slices 300, --size 64x64: synthesis on a grid of 300 x 64 x 64 float32 voxels (8 sample(s), at least "
     "22 volumes at once) need"),
], ids=["num-slices", "size", "samples"])
def test_grids_past_the_memory_budget_are_refused_before_allocation(model_folder, tmp_path, sources, capsys,
                                                                    monkeypatch, options, message):
    monkeypatch.setenv(ENV, "64MiB")
    line = refused(["--model", model_folder, "--source", sources, "--out", tmp_path / "out", *options], capsys,
                   message)
    assert "more than the 64.0 MiB lift3d may use" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-3", "1", "two"])
def test_a_window_out_of_range_names_the_option_and_the_valid_range(tmp_path, capsys, value):
    argparse_refused(["--model", tmp_path, "--source", tmp_path, "--out", tmp_path / "o", f"--window={value}"], capsys,
                     f"argument --window: expected 0 (always the whole volume) or a window of at least 2 slices, "
                     f"got {value!r}")


def test_an_overlap_as_large_as_the_window_names_both_options(model_folder, tmp_path, sources, capsys):
    refused(["--model", model_folder, "--source", sources, "--out", tmp_path / "o", "--window", 4, "--overlap", 6],
            capsys, "--overlap 6 with --window 4: overlap must be smaller than the window (4 slices), got 6; valid "
                    "--overlap: 0 to 3")
    # No --window: a source longer than the model's 8 slices is windowed by 8, and --overlap must fit that.
    refused(["--model", model_folder, "--source", sources, "--out", tmp_path / "o", "--num-slices", "native",
             "--overlap", 9], capsys, "--overlap 9: overlap must be smaller than the window (8 slices), got 9")


@pytest.mark.parametrize("device", ["meta", "xla:0", "banana"])
def test_a_device_that_cannot_synthesise_is_refused_with_the_valid_ones(tmp_path, capsys, device):
    argparse_refused(["--model", tmp_path / "no-model", "--source", tmp_path, "--out", tmp_path / "o", "--device",
                      device], capsys, f"argument --device: expected a device that can run synthesis: cpu, cuda, "
                                       f"cuda:N or mps; got {device!r}")


# -- hostile headers reach both tools through the one reader -------------------------------------------


def hostile(path, **fields):
    path.write_bytes(with_fields(VALID, **fields))
    return path


@pytest.mark.parametrize("fields, message", [
    ({"dim": [3, 32767, 32767, 32767, 1, 1, 1, 1]}, "its header's 32767 x 32767 x 32767 int16 voxels"),
    ({"datatype": 999}, "its header's datatype code 999 is not a scalar type lift3d reads"),
    ({"datatype": 32, "bitpix": 64}, "holds complex-valued voxels (complex64, datatype 32)"),
], ids=["32767-cubed", "datatype-999", "complex"])
def test_hostile_headers_are_one_line_in_synthesize_and_evaluate(model_folder, tmp_path, capsys, monkeypatch,
                                                                 fields, message):
    monkeypatch.setenv(ENV, "64MiB")
    bad = hostile(tmp_path / "bad.nii", **fields)
    refused(["--model", model_folder, "--source", bad, "--out", tmp_path / "o", "--steps", 2], capsys,
            f"{bad}: {message}")
    good = write_source(tmp_path / "good.nii.gz")
    refused(["--pred", good, "--target", bad, "--out", tmp_path / "e"], capsys, f"cannot read target {bad}: {message}",
            main=evaluate)
    refused(["--pred", bad, "--target", good, "--out", tmp_path / "e"], capsys,
            f"cannot read prediction {bad}: {message}", main=evaluate)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_a_fifo_source_is_called_a_fifo(model_folder, tmp_path, capsys):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    line = refused(["--model", model_folder, "--source", fifo, "--out", tmp_path / "o"], capsys,
                   f"{fifo}: is a FIFO (named pipe), not an image file")
    assert "folder" not in line
