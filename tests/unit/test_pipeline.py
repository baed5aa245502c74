"""The image pipeline: the split of the cores between decode workers and torch comes from measured costs,
and trying splits mid-stream never changes what comes out."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.conftest import pattern_image
from vitrine.errors import ImageDecodeError
from vitrine.model.encoder import Encoder
from vitrine.model.pipeline import Costs, Split, Tuner, predicted_rate, propose


def test_propose_divides_the_cores_in_proportion_to_the_measured_costs():
    assert propose(2, Costs(prepare=0.01, forward=0.01)) == [Split(2, 1), Split(1, 1)]
    # a cheap decode beside a costly model: most cores to torch, two workers keep pace
    assert propose(16, Costs(prepare=0.002, forward=0.014)) == [Split(16, 2), Split(14, 2)]
    # large photos and an int8 model: decoding is the heavy stage and gets most cores
    assert propose(8, Costs(prepare=0.03, forward=0.01)) == [Split(8, 6), Split(2, 6)]
    assert propose(1, Costs(prepare=0.01, forward=0.01)) == [Split(1, 1)]


def test_predicted_rate_is_bounded_by_the_slower_stage():
    costs = Costs(prepare=0.004, forward=0.016)
    assert predicted_rate(2, Split(1, 1), costs) == pytest.approx(1 / 0.016)  # the model, on one core
    assert predicted_rate(2, Split(2, 1), costs) == pytest.approx(2 / 0.020)  # both stages share 2 cores


def _drive(tuner: Tuner, rates: dict[Split, float], costs: Costs, batches: int) -> list[Split]:
    """Run ``batches`` batches through the tuner, each split measuring ``rates[split]`` items/s."""
    used, previous = [], None
    for _ in range(batches):
        split = tuner.next_split(costs)
        tuner.record(split, rates.get(split, 1.0), split != previous)
        used.append(split)
        previous = split
    return used


def test_tuner_keeps_the_split_measured_fastest_and_plans_again_later():
    costs = Costs(prepare=0.01, forward=0.01)
    shared, dedicated = propose(2, costs)
    tuner = Tuner(2, start=Split(2, 1), trial_batches=3, replan_batches=5)
    used = _drive(tuner, {shared: 40.0, dedicated: 90.0}, costs, 1 + 3 + 3 + 6)
    assert used[:7] == [Split(2, 1)] + [shared] * 3 + [dedicated] * 3  # warm-up, then each candidate
    assert used[7:13] == [dedicated] * 6  # the faster one, until the plan is made again
    assert dict(tuner.trials) == {shared: 40.0, dedicated: 90.0}
    # the costs changed (a faster runtime, other photos): the next plan measures again and switches
    used = _drive(tuner, {shared: 120.0, dedicated: 90.0}, costs, 3 + 3 + 2)
    assert used[-2:] == [shared, shared] and tuner.current == shared


def test_stream_trying_splits_gives_every_item_its_own_embedding_in_order(clip_path, tmp_path):
    """Many small batches, so the pipeline changes torch's threads and its workers mid-stream: results
    stay in input order, equal to encoding each image alone; bad items are their own errors; torch's
    thread count is given back."""
    encoder = Encoder.from_pretrained(str(clip_path), device="cpu", batch_size=2)
    paths = []
    for i in range(24):
        path = tmp_path / f"{i:02d}.png"
        if i % 7 == 3:
            path.write_bytes(b"not an image")
        else:
            pattern_image(i, (40 + i, 30 + 2 * i)).save(path)
        paths.append(str(path))
    threads = torch.get_num_threads()
    results = list(encoder.encode_stream(paths, encoder.load_image))
    assert torch.get_num_threads() == threads
    assert [item for item, _ in results] == paths
    for path, row in results:
        if path.endswith(("03.png", "10.png", "17.png")):
            assert isinstance(row, ImageDecodeError) and "not an image" in row.reason
            continue
        alone = encoder.encode_pixels(encoder.preprocess([encoder.load_image(path)]))[0]
        np.testing.assert_allclose(row, alone, atol=2e-2)  # bf16 batches of other sizes round apart
        assert float(row @ alone) > 0.999
    stats = encoder.pipeline_stats
    assert stats.items == 24 and stats.batches == 12
    if (os.cpu_count() or 1) >= 2 and len(os.sched_getaffinity(0)) >= 2:
        assert {s for s, _ in stats.trials} == set(propose(len(os.sched_getaffinity(0)), stats.costs()))
    assert stats.decode_cpu > 0 and stats.preprocess_cpu > 0 and stats.forward > 0


def test_a_fixed_worker_count_leaves_torch_threads_alone(clip_path, tmp_path):
    encoder = Encoder.from_pretrained(str(clip_path), device="cpu", batch_size=2, num_workers=1)
    for i in range(12):
        pattern_image(i).save(tmp_path / f"{i}.png")
    threads = torch.get_num_threads()
    rows = encoder.encode_images(sorted(tmp_path.glob("*.png")))
    assert rows.shape == (12, encoder.dim) and torch.get_num_threads() == threads
    assert encoder.pipeline_stats.trials == [] and encoder.pipeline_stats.split == Split(threads, 1)
