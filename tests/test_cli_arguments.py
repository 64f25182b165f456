"""The command-line number types: every bad value is one line naming the option, the value and the valid
range, parsed before anything is read or written (no Python or torch wording, no overflow deep inside)."""

from __future__ import annotations

import argparse

import pytest

from lift3d.cli import arguments
from lift3d.cli import main as lift3d_cli
from lift3d.cli import synthesize as synthesize_cli

HUGE = "9" * 400


def refusal(parse, text: str) -> str:
    parser = argparse.ArgumentParser(prog="tool", exit_on_error=False)
    parser.add_argument("--value", type=parse)
    with pytest.raises(argparse.ArgumentError) as info:
        parser.parse_args([f"--value={text}"])
    return str(info.value)


@pytest.mark.parametrize("parse, text, message", [
    (arguments.seed, HUGE, f"argument --value: expected a seed from 0 to {2**64 - 1}, got '9999"),
    (arguments.seed, "-1", f"expected a seed from 0 to {2**64 - 1}, got -1"),
    (arguments.seed, "1e3", "got '1e3'"),
    (arguments.training_seed, str(2**32), f"expected a seed from 0 to {2**32 - 1}, got '{2**32}'"),
    (arguments.positive, "0", "expected a positive integer, got 0"),
    (arguments.positive, HUGE, f"expected a positive integer no larger than {2**31 - 1}, got '999"),
    (arguments.positive, "9" * 5000, "expected a positive integer no larger than"),  # past int()'s digit limit
    (arguments.positive, "²", "expected a positive integer, got '²'"),  # str.isdigit, but not int()
    (arguments.non_negative, "-3", "expected a non-negative integer, got -3"),
    (arguments.non_negative, "0x10", "got '0x10'"),
    (arguments.threads, "0", f"expected 'auto' or a whole number from 1 to {2**31 - 1}, got '0'"),
    (arguments.threads, HUGE, "expected 'auto' or a whole number"),
    (arguments.window, HUGE, f"a window of at least 2 slices (at most {2**31 - 1}), got '999"),
    (arguments.in_plane_size, "0x16", "expected N, HxW (positive integers up to"),
    (arguments.in_plane_size, "²", "got '²'"),
    (arguments.in_plane_size, "16x16x16", "got '16x16x16'"),
    (arguments.strength, "nan", "expected a number in (0, 1), got 'nan'"),
])
def test_a_bad_number_is_one_line_with_the_option_the_value_and_the_range(parse, text, message):
    line = refusal(parse, text)
    assert message in line and "\n" not in line
    assert len(line) < 200  # a 400-digit value is cut short
    assert "invalid literal" not in line and "Overflow" not in line


@pytest.mark.parametrize("parse, text, value", [
    (arguments.seed, str(2**64 - 1), 2**64 - 1), (arguments.seed, "0", 0),
    (arguments.training_seed, str(2**32 - 1), 2**32 - 1), (arguments.positive, str(2**31 - 1), 2**31 - 1),
    (arguments.threads, "auto", "auto"), (arguments.threads, "2", 2), (arguments.window, "0", 0),
    (arguments.in_plane_size, "16X24", (16, 24)), (arguments.in_plane_size, "native", "native"),
])
def test_the_ends_of_each_range_are_accepted(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("argv, message", [
    (["demo", "--seed", HUGE], f"argument --seed: expected a seed from 0 to {2**32 - 1}"),
    (["demo", "--threads", "many"], "argument --threads: expected 'auto' or a whole number from 1"),
    (["inflate", "a", "b", "--seed", HUGE], f"argument --seed: expected a seed from 0 to {2**64 - 1}"),
])
def test_the_lift3d_command_refuses_a_bad_seed_before_it_writes(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        lift3d_cli.main([*argv, "--out", str(out)] if argv[0] == "demo" else argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_synthesize_refuses_a_seed_torch_cannot_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        synthesize_cli.main(["--model", str(tmp_path), "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--seed", str(2**64)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"argument --seed: expected a seed from 0 to {2**64 - 1}, got '{2**64}'" in err


def test_an_overflow_is_one_line_not_a_traceback(capsys):
    @lift3d_cli.run_cli
    def overflowing(argv):
        raise OverflowError("Python int too large to convert to C long")

    assert overflowing([]) == 2
    assert capsys.readouterr().err.count("\n") == 1
