"""The two-sample tests behind drift detection: calibrated under no shift, powerful under a real one."""

from __future__ import annotations

import numpy as np
import pytest

from vitrine.drift.twosample import Sample, TwoSampleSettings, compare, roc_auc


def _draw(rng: np.random.Generator, n: int, dim: int = 32, shift: float = 0.0) -> np.ndarray:
    """Unit vectors from an anisotropic Gaussian (like embeddings), optionally moved along one axis."""
    scales = np.linspace(1.0, 0.2, dim)
    x = rng.standard_normal((n, dim)) * scales
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_false_alarm_rate_stays_at_alpha_over_repeated_draws():
    """200 pairs of samples from one distribution: flags at alpha=0.05 must stay near 5 % (binomial
    upper bound 0.05 + 3 sd = 0.096), and AUC must hover at 0.5."""
    rng = np.random.default_rng(7)
    settings = [TwoSampleSettings(alpha=0.05, permutations=99, seed=i) for i in range(200)]
    results = [compare(_draw(rng, 80), _draw(rng, 80), s) for s in settings]
    rate = np.mean([r.drifted for r in results])
    assert rate <= 0.096, f"false-alarm rate {rate:.3f} above alpha 0.05"
    p_values = np.array([r.p_value for r in results])
    assert 0.35 < p_values.mean() < 0.65, "p-values under no shift should be roughly uniform"
    assert abs(np.mean([r.auc for r in results]) - 0.5) < 0.05


def test_a_planted_shift_is_detected_with_its_effect_sizes():
    rng = np.random.default_rng(1)
    reference, live = _draw(rng, 400), _draw(rng, 400, shift=0.6)
    result = compare(reference, live)
    assert result.drifted and result.p_value < 0.01
    assert result.auc > 0.6  # the best possible classifier (the shifted axis itself) reaches 0.65
    null = compare(reference, _draw(rng, 400))
    assert result.mean_shift > 2 * null.mean_shift
    assert result.mmd > 5 * max(null.mmd, 1e-6)


def test_min_auc_gate_ignores_significant_but_tiny_shifts():
    rng = np.random.default_rng(2)
    reference, live = _draw(rng, 1000), _draw(rng, 1000, shift=0.25)
    plain = compare(reference, live, TwoSampleSettings(alpha=0.01))
    gated = compare(reference, live, TwoSampleSettings(alpha=0.01, min_auc=0.9))
    assert plain.p_value < 0.01
    assert plain.drifted and not gated.drifted


def test_settings_refuse_an_alpha_the_permutations_cannot_reach():
    with pytest.raises(ValueError, match="permutations"):
        TwoSampleSettings(alpha=0.001, permutations=200)
    with pytest.raises(ValueError, match="alpha"):
        TwoSampleSettings(alpha=1.5)


def test_samples_are_capped_and_checked():
    rng = np.random.default_rng(3)
    result = compare(_draw(rng, 300), _draw(rng, 50), TwoSampleSettings(max_samples=100))
    assert (result.n_reference, result.n_live) == (100, 50)
    with pytest.raises(ValueError, match="width"):
        compare(_draw(rng, 10, 8), _draw(rng, 10, 16))


def test_roc_auc_matches_its_definition_with_ties():
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3])
    positive = np.array([False, True, False, True, False])
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert roc_auc(scores, positive) == pytest.approx(expected)


def test_sample_slices_by_metadata_value():
    sample = Sample(np.eye(3, dtype=np.float32), [{"folder": "a"}, {"folder": "b"}, {}])
    assert sample.slice_values("folder") == ["a", "b", None]
    assert len(sample.where("folder", "a")) == 1
    with pytest.raises(ValueError, match="3 embeddings but 1 metadata rows"):
        Sample(np.eye(3), [{}])
