"""Corrections for many tests must never make a test unable to fire."""

from __future__ import annotations

import numpy as np

from vitrine.drift.assess import DriftSettings, compare_samples, corrected
from vitrine.drift.twosample import Sample, TwoSampleSettings


def test_every_shifted_slice_is_flagged_even_with_many_slices():
    """Eight slices at alpha 0.01: a Bonferroni-corrected p-value needs more than 800 permutations to
    get under alpha, so the slice tests must get them (with the default 200 none could ever fire)."""
    rng = np.random.default_rng(0)
    ref = Sample(rng.normal(size=(400, 16)), [{"folder": f"d{i % 8}"} for i in range(400)])
    live = Sample(rng.normal(size=(240, 16)) + 3.0, [{"folder": f"d{i % 8}"} for i in range(240)])
    overall, field, slices = compare_samples(ref, live, DriftSettings(min_slice=20))
    assert overall.drifted and field == "folder"
    assert len(slices) == 8 and all(s["drifted"] for s in slices.values()), slices


def test_calm_slices_stay_calm():
    rng = np.random.default_rng(1)
    ref = Sample(rng.normal(size=(400, 16)), [{"folder": f"d{i % 4}"} for i in range(400)])
    live = Sample(rng.normal(size=(200, 16)), [{"folder": f"d{i % 4}"} for i in range(200)])
    overall, _, slices = compare_samples(ref, live, DriftSettings())
    assert not overall.drifted and not any(s["drifted"] for s in slices.values())


def test_corrected_settings_leave_room_under_alpha():
    base = TwoSampleSettings(alpha=0.01, permutations=200)
    assert corrected(base, 1) is base
    for count in (2, 3, 8):
        tests = corrected(base, count)
        assert count / (tests.permutations + 1) <= base.alpha / 2
