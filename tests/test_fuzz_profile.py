"""The fuzz tests' strength is a hypothesis profile chosen by LIFT3D_HYPOTHESIS_PROFILE: a small sample in
every run, the full counts under ``thorough`` (CI's fuzz pass)."""

from __future__ import annotations

import pytest
from hypothesis import settings

from tests.conftest import FUZZ_MINIMUM, HYPOTHESIS_PROFILE, fuzz_examples, hypothesis_profile


def test_the_profile_scales_each_fuzz_tests_own_count():
    if HYPOTHESIS_PROFILE == "thorough":
        assert fuzz_examples(800) == 800
    else:
        assert FUZZ_MINIMUM <= fuzz_examples(800) <= 80 and fuzz_examples(60) == FUZZ_MINIMUM
    assert settings.default.deadline is None  # tiny models on a busy CPU: no flaky per-example deadline


def test_an_unknown_profile_is_one_line_naming_the_valid_ones():
    assert hypothesis_profile({}) == "default"
    assert hypothesis_profile({"LIFT3D_HYPOTHESIS_PROFILE": "thorough"}) == "thorough"
    with pytest.raises(pytest.UsageError, match=r"^LIFT3D_HYPOTHESIS_PROFILE='exhaustive' is not a hypothesis "
                                                r"profile; valid: default, thorough$"):
        hypothesis_profile({"LIFT3D_HYPOTHESIS_PROFILE": "exhaustive"})
