"""``lift3d inflate`` and ``save_lifted`` refuse a kernel size the lifted model's reader would refuse, before
anything is written."""

import pytest
import torch

import lift3d
from lift3d.cli.main import main
from lift3d.io.errors import Lift3dError
from lift3d.lifting.checkpoint import save_lifted


@pytest.mark.parametrize("kernel_size", ["1025", "4", "0", "-3"])
def test_inflate_refuses_an_unreadable_kernel_size_before_writing(tmp_path, capsys, kernel_size):
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    code = main(["inflate", str(stage1), str(tmp_path / "out"), "--kernel-size", kernel_size])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.endswith(f"--kernel-size {kernel_size} is not usable; valid: an odd integer from 1 to 1023")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1"] and not any(stage1.iterdir())


def test_save_lifted_refuses_settings_its_reader_would_refuse(tmp_path):
    model = lift3d.inflate(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)), "depthwise", kernel_size=1025)
    with pytest.raises(Lift3dError, match=r"model/lift3d.json: lift settings is not valid: .*kernel_size.*1023"):
        save_lifted(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
