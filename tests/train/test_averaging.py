"""``--ema``: the running average against a hand computation, the swap used by evaluations, and its
checkpoint state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train_contrastive.averaging import WeightAverage


def two_weights() -> nn.Module:
    model = nn.Linear(1, 1)
    model.bias.requires_grad_(False)  # frozen: never averaged
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(5.0)
    return model


def test_the_average_follows_the_warmed_up_decay() -> None:
    model = two_weights()
    average = WeightAverage(model, decay=0.2)
    assert set(average.shadow) == {"weight"}
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        decay = min(0.2, (1 + step) / (10 + step))  # 1/10, 2/11, then the cap 0.2
        expected = decay * expected + (1 - decay) * value
        average.update(model)
        assert average.shadow["weight"].item() == pytest.approx(expected)
    assert expected == pytest.approx(0.2 * (0.2 * 1.8 + 0.8 * 3) + 0.8 * 4)  # 0.9, then 1.8, 2.76, 3.752


def test_swapped_lends_the_average_and_gives_the_weights_back() -> None:
    model = two_weights()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(7.0)
    with average.swapped(model):
        assert model.weight.item() == 0.0 and model.bias.item() == 5.0
    assert model.weight.item() == 7.0
    average.copy_to(model)
    assert model.weight.item() == 0.0


def test_state_round_trip_and_off() -> None:
    model = two_weights()
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model)
    other = WeightAverage(two_weights(), decay=0.9)
    other.load_state_dict(average.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["weight"], average.shadow["weight"])
    off = WeightAverage(model, decay=0.0)
    assert not off.active
    off.update(model)
    with off.swapped(model):
        assert model.weight.item() == 1.0
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)


@pytest.mark.slow
def test_the_saved_model_is_the_average_not_the_last_weights(towers_dir, tmp_path) -> None:
    """Without evaluation data the output holds the final average; the last checkpoint keeps both the raw
    weights (for resuming) and the average, and they differ."""
    import sys

    from safetensors.torch import load_file

    from tests.train.conftest import FAST, run_module, tower_flags, write_pairs

    data, out = write_pairs(tmp_path / "pairs", copies=1), tmp_path / "out"
    run_module(
        [
            *(sys.executable, "-m", "train_contrastive", "train", *tower_flags(towers_dir), *FAST),
            *("--train-data", str(data), "--output", str(out), "--ema", "0.8"),
            *("--batch-size", "4", "--epochs", "2", "--checkpoint-every", "0"),
        ]
    )
    last = sorted((out / "checkpoints").iterdir())[-1]
    raw = load_file(last / "model.safetensors")
    # registered after the loop state (0) and the queue (1)
    average = torch.load(last / "custom_checkpoint_2.pkl", weights_only=False)["shadow"]
    from transformers import AutoModel

    saved = dict(AutoModel.from_pretrained(out).named_parameters())
    assert average and set(average) <= set(saved)
    for name, value in average.items():
        torch.testing.assert_close(saved[name].detach(), value)
    raw = {k.removeprefix("model."): v for k, v in raw.items()}  # the training module wraps the model
    assert set(average) <= set(raw)
    assert any(not torch.allclose(raw[name], average[name]) for name in average)
