"""The automatic plan: its rule on fingerprints of other grids, and the editable plan.json's reader."""

from __future__ import annotations

import json

import pytest

from lift3d.data.fingerprint import Fingerprint, SubjectFingerprint
from lift3d.io.errors import Lift3dError
from lift3d.recipes.plan import Plan, load_plan, make_plan, save_plan


def _fingerprint(shape, spacing, orientation="RAS", count=24) -> Fingerprint:
    subject = SubjectFingerprint("s", tuple(shape), tuple(spacing), tuple(orientation), (0.0, 1.0, 2.0), None, None)
    return Fingerprint("T1", "T2", tuple(subject for _ in range(count)))


def test_anisotropic_voxels_slice_along_the_coarse_axis():
    plan = make_plan(_fingerprint((60, 220, 200), (4.0, 1.0, 1.0), "LPS"))  # sagittal acquisition, 4 mm slices
    assert plan.slice_axis == "sagittal"
    assert plan.size == 48 and plan.size % plan.multiple == 0
    assert 8 <= plan.num_slices <= 32
    assert "coarser" in plan.why["slice_axis"]


def test_isotropic_voxels_slice_axially_and_small_volumes_keep_their_size():
    plan = make_plan(_fingerprint((30, 30, 20), (2.0, 2.0, 2.0)))
    assert plan.slice_axis == "axial"
    assert plan.size == 32  # 30 native voxels rounded up to the U-Net's multiple of 4, under the CPU cap
    assert plan.num_slices == 21  # 40 mm at the 32-voxel grid's 1.9 mm


def test_the_split_leaves_training_subjects_and_a_gpu_gets_the_papers_grid():
    small = make_plan(_fingerprint((64, 64, 32), (1.0, 1.0, 1.0), count=6))
    assert small.val_size + small.test_size <= 4
    gpu = make_plan(_fingerprint((256, 256, 160), (1.0, 1.0, 1.0)), device="cuda")
    assert gpu.size == 256 and gpu.widths == [64, 128, 256, 256]


def test_plan_json_round_trips_and_refuses_typos_and_bad_values(tmp_path):
    plan = make_plan(_fingerprint((64, 64, 32), (1.0, 1.0, 1.0)))
    path = save_plan(plan, tmp_path)
    assert load_plan(path) == plan
    edited = json.loads(path.read_text())
    edited["stage1_step"] = 10
    path.write_text(json.dumps(edited))
    with pytest.raises(Lift3dError, match=r"plan.json: plan is not valid: stage1_step is not a key lift3d reads; valid keys: baseline"):
        load_plan(path)
    edited = {**json.loads(save_plan(plan, tmp_path).read_text()), "evaluation_budget": 0}
    path.write_text(json.dumps(edited))
    with pytest.raises(Lift3dError, match="evaluation_budget must be >= 1, got 0"):
        load_plan(path)
    assert Plan().multiple == 4


def test_a_plan_json_that_links_out_of_its_run_folder_is_refused(tmp_path):
    outside = save_plan(Plan(), tmp_path / "elsewhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").symlink_to(outside)
    with pytest.raises(Lift3dError, match="plan"):
        load_plan(run / "plan.json")


def test_phases_never_clear_a_folder_through_a_link(tmp_path):
    from lift3d.recipes.phases import Phases

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage1").symlink_to(victim)
    with pytest.raises(Lift3dError, match="stage1"):
        Phases(run, log=lambda _: None).run("stage1", {"k": 1}, lambda folder: {})
    assert (victim / "keep.txt").read_text() == "mine"


def test_solver_candidates_pair_samples_antithetically_only_where_it_can_help():
    from lift3d.recipes.fit_phases import solver_candidates

    plan = Plan(evaluation_budget=4, solver_steps=[1, 2], solver_samples=[1, 2])
    rows = solver_candidates("ddpm", plan)
    paired = {(r["solver"], r["steps"], r["samples"]) for r in rows if r["antithetic"]}
    assert paired == {(s, n, 2) for s in ("ddim", "dpm") for n in (1, 2)}  # K >= 2, deterministic solvers only
    assert all(not r["antithetic"] for r in rows if r["solver"] == "ddpm")
    assert not any(r["antithetic"] for r in solver_candidates("flow", plan.model_copy(
        update={"solver_antithetic": False})))
