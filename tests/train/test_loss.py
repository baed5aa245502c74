"""Each ``--loss`` against a hand computation on a 2×2 or 3×3 batch (plain tensors, one process).

Images are the unit vectors, so the cosine similarity of image i and caption j is caption j's i-th
coordinate and every matrix below can be read off the captions.
"""

from __future__ import annotations

import math

import pytest
import torch

from train_contrastive.loss import contrastive_loss, hardest_negative_loss, sigmoid_loss

LN10 = torch.tensor(math.log(10.0))


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x): the cost of a logit x on the wrong side."""
    return math.log1p(math.exp(x))


def two_by_two() -> tuple[torch.Tensor, torch.Tensor]:
    """cos = [[1, 0.6], [0, 0.8]]."""
    return torch.eye(2), torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def test_infonce_is_the_mean_of_both_cross_entropies() -> None:
    images, texts = two_by_two()
    result = contrastive_loss(images, texts, LN10)  # logits 10·cos = [[10, 6], [0, 8]]
    rows = (softplus(6 - 10) + softplus(0 - 8)) / 2
    columns = (softplus(0 - 10) + softplus(6 - 8)) / 2
    assert float(result.loss) == pytest.approx((rows + columns) / 2, rel=1e-6)
    assert result.negatives == 1 and result.accuracy == 1.0


def test_siglip_sums_a_sigmoid_per_pair_averaged_over_rows() -> None:
    images, texts = two_by_two()
    bias = torch.tensor(-10.0)
    result = sigmoid_loss(images * 3, texts, LN10, bias)  # embeddings are normalised first
    # z = 10·cos - 10 = [[0, -4], [-10, -2]]; positives pay softplus(-z), negatives softplus(z)
    expected = (softplus(-0.0) + softplus(-4.0) + softplus(-10.0) + softplus(2.0)) / 2
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)
    assert result.negatives == 1


def test_siglip_learns_its_bias_and_temperature() -> None:
    images, texts = two_by_two()
    scale, bias = LN10.clone().requires_grad_(True), torch.tensor(-10.0, requires_grad=True)
    sigmoid_loss(images, texts, scale, bias).backward_loss.backward()
    # with so negative a bias the positives pull it up: the gradient on the bias is negative
    assert scale.grad is not None and float(bias.grad) < 0
    with pytest.raises(ValueError, match="needs a learnt bias"):
        sigmoid_loss(images, texts, LN10)


def three_by_three() -> tuple[torch.Tensor, torch.Tensor]:
    """cos = [[0.8, 0.6, 0.6], [0.6, 0.8, 0], [0, 0, 0.8]]."""
    return torch.eye(3), torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.6, 0.0, 0.8]])


def test_hardest_negative_pays_the_margin_on_the_most_similar_wrong_item_only() -> None:
    images, texts = three_by_three()
    result = hardest_negative_loss(images, texts, margin=0.3)
    # image i: max(0, 0.3 - s_ii + max_{j≠i} s_ij) = 0.1, 0.1, 0 (its best wrong caption scores 0)
    # caption j: max(0, 0.3 - s_jj + max_{i≠j} s_ij) = 0.1, 0.1, 0.1
    assert float(result.loss) == pytest.approx(0.5 / 3, rel=1e-5)
    texts = texts.clone().requires_grad_(True)
    hardest_negative_loss(images, texts, margin=0.3).backward_loss.backward()
    # caption 2 is no image's hardest negative and image 2 no caption's: only its own margin term acts
    # on it, through s_22 (coordinate 2) and s_02 (coordinate 0), never through s_12 (coordinate 1)
    assert float(texts.grad[2, 1]) == 0.0
    assert result.negatives == 2


def test_the_default_recipe_keeps_infonce_and_clips_temperature() -> None:
    from train_contrastive.args import TrainArgs, parse

    base = ["--model", "m", "--train-data", "d", "--output", "o"]
    default = parse(TrainArgs, base, "train")
    assert default.loss == "infonce" and default.initial_temperature == 0.07
    assert parse(TrainArgs, [*base, "--loss", "siglip"], "train").initial_temperature == 0.1
    chosen = parse(TrainArgs, [*base, "--loss", "siglip", "--temperature", "0.05"], "train")
    assert chosen.initial_temperature == 0.05
