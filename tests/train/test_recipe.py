"""Recipe options of ``train_contrastive train`` (issue 15): multi-positive targets against hand
computations, queue negatives that never hold a query's positive, text dropout, per-tower blocks and
learning rates, and ``--config`` recipes with their precedence.

As in test_loss.py, images are unit vectors, so cos(image i, caption j) is caption j's i-th coordinate.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from train_contrastive.args import ConfigError, TrainArgs, parse, recipe_names
from train_contrastive.loss import (
    GlobalBatch,
    Negatives,
    _caption_similarity_targets,
    _directions,
    contrastive_loss,
    hardest_negative_loss,
    sigmoid_loss,
)
from train_contrastive.queue import NegativeQueue

LN10 = torch.tensor(math.log(10.0))
BASE = ["--model", "m", "--train-data", "d", "--output", "o"]


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def two_images_three_captions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image 0 has captions 0 and 1, image 1 caption 2; cos = [[1, 0.6, 0], [0, 0.8, 1]]."""
    return torch.eye(2), torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), torch.tensor([0, 0, 1])


def test_infonce_all_captions_target_is_uniform_over_own_captions() -> None:
    images, texts, owner = two_images_three_captions()
    result = contrastive_loss(images, texts, LN10, owner=owner)  # logits [[10, 6, 0], [0, 8, 10]]
    image_side = ((2 * lse(10, 6, 0) - 10 - 6) / 2 + (lse(0, 8, 10) - 10)) / 2
    caption_side = ((lse(10, 0) - 10) + (lse(6, 8) - 6) + (lse(0, 10) - 10)) / 3
    assert float(result.loss) == pytest.approx((image_side + caption_side) / 2, rel=1e-6)
    assert result.pairs == 2 and result.negatives == 1
    # caption 1's best image is image 1 (0.8 > 0.6): 2 of 3 captions and both images are right
    assert result.accuracy == pytest.approx((1.0 + 2 / 3) / 2)


def softmax(*xs: float) -> list[float]:
    return [math.exp(x - lse(*xs)) for x in xs]


def cross_entropy(target: list[float], logits: list[float]) -> float:
    return -sum(t * (z - lse(*logits)) for t, z in zip(target, logits, strict=True))


def test_soft_targets_spread_by_caption_likeness() -> None:
    """ε = 0.25 of each target follows the captions: image 0's caption centroid is normalise(c0 + c1) =
    (2, 1)/√5, image 1's is c2 = (0, 1); cosines against them at teacher temperature 0.2 give the soft
    rows; the logits keep the model's scale (10)."""
    images, texts, owner = two_images_three_captions()
    eps, a, b = 0.25, 2 / math.sqrt(5), 1 / math.sqrt(5)  # centroid 0 = (a, b)
    mix = lambda hard, soft: [(1 - eps) * h + eps * q for h, q in zip(hard, soft, strict=True)]  # noqa: E731
    image_side = (
        cross_entropy(mix([0.5, 0.5, 0], softmax(5 * a, 5 * (0.6 * a + 0.8 * b), 5 * b)), [10, 6, 0])
        + cross_entropy(mix([0, 0, 1], softmax(0, 4, 5)), [0, 8, 10])
    ) / 2
    caption_side = (
        cross_entropy(mix([1, 0], softmax(5 * a, 0)), [10, 0])
        + cross_entropy(mix([1, 0], softmax(5 * (0.6 * a + 0.8 * b), 4)), [6, 8])
        + cross_entropy(mix([0, 1], softmax(5 * b, 5)), [0, 10])
    ) / 3
    result = contrastive_loss(images, texts, LN10, owner=owner, soft_targets=eps, soft_temperature=0.2)
    assert float(result.loss) == pytest.approx((image_side + caption_side) / 2, rel=1e-6)
    # the captions teach without being taught: the targets carry no gradient
    texts = texts.clone().requires_grad_(True)
    batch = GlobalBatch(images, texts, owner, torch.tensor([0, 1]), world=1)
    assert not any(t.requires_grad for t in _caption_similarity_targets(batch, 10.0))


def test_soft_targets_refuse_a_queue_and_other_losses() -> None:
    images, texts, owner = two_images_three_captions()
    queue = Negatives(torch.eye(2), torch.tensor([5, 6]), torch.eye(2), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="without a queue"):
        contrastive_loss(images, texts, LN10, owner=owner, queue=queue, soft_targets=0.1)
    for flags in (
        ["--loss", "siglip"],
        ["--queue-size", "8"],
        ["--soft-targets", "1"],
        ["--soft-temperature", "0"],
    ):
        with pytest.raises((ConfigError, ValueError, SystemExit)):
            parse(TrainArgs, [*BASE, "--soft-targets", "0.1", *flags], "train").validate()


def test_siglip_all_captions_labels_every_own_pair_positive() -> None:
    images, texts, owner = two_images_three_captions()
    result = sigmoid_loss(images, texts, LN10, torch.tensor(-10.0), owner=owner)
    # z = 10·cos - 10 = [[0, -4, -10], [-10, -2, 0]]; y = [[+, +, -], [-, -, +]]
    expected = (softplus(0) + softplus(4) + softplus(-10) + softplus(-10) + softplus(-2) + softplus(0)) / 2
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)


def test_hardest_all_captions_pays_a_margin_per_positive_pair() -> None:
    images, texts, owner = two_images_three_captions()
    result = hardest_negative_loss(images, texts, margin=0.3, owner=owner)
    # image pairs: (0,0) 0.3-1+0, (0,1) 0.3-0.6+0, (1,2) 0.3-1+0.8 -> 0, 0, 0.1 (mean 0.1/3)
    # caption pairs: c0 0.3-1+0, c1 0.3-0.6+0.8, c2 0.3-1+0 -> 0, 0.5, 0 (mean 0.5/3)
    assert float(result.loss) == pytest.approx(0.6 / 3, rel=1e-5)


def test_one_caption_per_image_is_the_owner_free_case() -> None:
    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    bias = torch.tensor(-2.0)
    for loss in (contrastive_loss, sigmoid_loss, hardest_negative_loss):
        plain = loss(images, texts, LN10, bias)
        linked = loss(images, texts, LN10, bias, owner=torch.arange(4), ids=torch.tensor([9, 8, 7, 6]))
        assert float(plain.loss) == pytest.approx(float(linked.loss), rel=1e-6), loss.__name__
    with pytest.raises(ValueError, match="give owner"):
        contrastive_loss(images, texts[:3], LN10)


def queue_of(image_id: int) -> Negatives:
    """A queue holding one caption and one image embedding, both [1, 0], of catalog image ``image_id``."""
    same = torch.tensor([[1.0, 0.0]])
    return Negatives(same, torch.tensor([image_id]), same, torch.tensor([image_id]))


@pytest.mark.parametrize("loss", [contrastive_loss, sigmoid_loss, hardest_negative_loss])
def test_queue_entries_of_the_querys_own_image_are_never_negatives(loss) -> None:
    """One pair, [1, 0] ↔ [0.8, 0.6], of catalog image 5; the queue holds that very image and caption."""
    image, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8, 0.6]])
    ids, bias = torch.tensor([5]), torch.tensor(-1.0)
    alone = loss(image, text, LN10, bias, margin=0.5, ids=ids)
    own = loss(image, text, LN10, bias, margin=0.5, ids=ids, queue=queue_of(5))
    assert float(own.loss) == pytest.approx(float(alone.loss), rel=1e-6)
    assert own.negatives == alone.negatives == 0
    # the same embeddings of another image are real (and hard) negatives
    other = loss(image, text, LN10, bias, margin=0.5, ids=ids, queue=queue_of(9))
    assert float(other.loss) > float(alone.loss) + 1e-2 and other.negatives == 1


def test_queue_keeps_the_newest_entries_and_masks_repeats_of_an_image() -> None:
    queue = NegativeQueue(size=5)
    assert queue.negatives() is None
    owner = torch.tensor([0, 0, 1, 2, 3])  # image 10 has two captions
    queue.push(GlobalBatch(torch.eye(4), torch.eye(4)[owner], owner, torch.tensor([10, 11, 12, 13]), world=1))
    negatives = queue.negatives()
    assert negatives is not None and negatives.image_ids.tolist() == [10, 11, 12, 13]
    assert negatives.text_ids.tolist() == [10, 10, 11, 12, 13]
    # the next epoch shows images 12 and 13 again, with images 20 and 21
    second = GlobalBatch(torch.eye(4), torch.eye(4), torch.arange(4), torch.tensor([12, 13, 20, 21]), world=1)
    i2t, t2i = _directions(second, queue.negatives())
    for d, queue_ids in ((i2t, negatives.text_ids), (t2i, negatives.image_ids)):
        allowed = d.allowed[:, d.scores.shape[1] - d.queued :]
        for row, query in enumerate(second.ids.tolist()):
            kept = queue_ids[allowed[row]].tolist()
            assert query not in kept, (row, kept)
            assert len(kept) == len(queue_ids) - queue_ids.tolist().count(query)
    queue.push(second)
    assert queue.negatives().image_ids.tolist() == [12, 13, 20, 21, 10]  # newest first, at most 5
    restored = NegativeQueue(size=5)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.texts, queue.texts)


def test_text_dropout_keeps_the_first_and_last_token_and_padding() -> None:
    from train_contrastive.model import drop_tokens

    mask = torch.tensor([[1] * 12 + [0] * 4, [1] * 3 + [0] * 13])
    torch.manual_seed(0)
    dropped = drop_tokens(mask, 0.5)
    assert dropped[0, 0] == 1 and dropped[0, 11] == 1 and dropped[1, 0] == 1 and dropped[1, 2] == 1
    assert int(dropped[0, 12:].sum()) == 0 and 2 <= int(dropped[0].sum()) < 12
    assert torch.equal(drop_tokens(mask, 0.0), mask)


def test_all_positives_batch_every_caption_with_its_image_row() -> None:
    from train_contrastive.cache import CachedCollator
    from train_contrastive.data import Pairs
    from train_contrastive.features import FeatureCache, TextStates

    pairs = Pairs(["a", "b", "c"], [("a1", "a2"), ("b1",), ("c1", "c2", "c3")])
    lengths = [2, 3, 1, 2, 2, 2]  # tokens of each caption, in catalog order
    offsets = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()])
    flat = torch.arange(int(offsets[-1]), dtype=torch.float32)[:, None].repeat(1, 4)
    cache = FeatureCache(
        images=torch.arange(3, dtype=torch.float32)[:, None, None].repeat(1, 2, 4),
        image_row=torch.arange(3),
        texts=TextStates(flat, offsets),
        caption_offsets=torch.tensor([0, 2, 3, 6]),
        failures={},
    )
    batch = CachedCollator(cache, pairs, seed=0, positives="all")([2, 0])
    assert batch["owner"].tolist() == [0, 0, 0, 1, 1]
    assert batch["text_states"][:, 0, 0].tolist() == [6.0, 8.0, 10.0, 0.0, 2.0]  # first token of each
    one = CachedCollator(cache, pairs, seed=0)([2, 0])
    assert one["owner"].tolist() == [0, 1] and one["text_states"].shape[0] == 2


def test_config_precedence_defaults_then_file_then_flags(tmp_path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('epochs = 3\nlr = 1e-4\nloss = "hardest"\ntext-blocks = 6\n')
    chosen = parse(TrainArgs, [*BASE, "--config", str(recipe), "--epochs", "5"], "train")
    assert (chosen.epochs, chosen.lr, chosen.loss) == (5, 1e-4, "hardest")  # flag > file > default
    assert chosen.batch_size == 128 and chosen.blocks == {"vision": 6, "text": 6}
    assert chosen.tower_lr == {"vision": 1e-4, "text": 1e-4}
    named = parse(TrainArgs, [*BASE, "--config", "siglip", "--text-lr", "1e-5"], "train")
    assert named.loss == "siglip" and named.tower_lr == {"vision": 3e-4, "text": 1e-5}
    assert parse(TrainArgs, [*BASE, "--config", "batch-64"], "train").batch_size == 64  # an earlier default
    assert parse(TrainArgs, BASE, "train").ema == 0.99  # the default keeps the weights' average
    assert parse(TrainArgs, [*BASE, "--config", "no-ema"], "train").ema == 0.0
    with pytest.raises(ConfigError, match=r"no config file or recipe named 'nope'; recipes: all-captions"):
        parse(TrainArgs, [*BASE, "--config", "nope"], "train")
    recipe.write_text("epochs = \n")
    with pytest.raises(ConfigError, match="cannot parse config"):
        parse(TrainArgs, [*BASE, "--config", str(recipe)], "train")


def test_the_default_recipe_file_is_the_defaults_and_every_recipe_is_valid() -> None:
    assert "default" in recipe_names() and len(recipe_names()) >= 6
    written = parse(TrainArgs, [*BASE, "--config", "default"], "train")
    built_in = parse(TrainArgs, BASE, "train")
    assert written.blocks == built_in.blocks == {"vision": 6, "text": 3}
    per_tower = {"unfreeze_last_n": None, "vision_blocks": None, "text_blocks": None}
    assert dataclasses.replace(written, **per_tower) == built_in  # the file spells the blocks out
    towers = ["--vision-model", "v", "--text-model", "t", "--train-data", "d", "--output", "o"]
    for name in recipe_names():  # as the sweep runs them: on a dual encoder built from towers
        parse(TrainArgs, [*towers, "--config", name], "train").validate()


def test_trainable_blocks_per_tower_flag_then_both_towers_flag_then_default() -> None:
    def blocks(*flags: str) -> dict[str, int]:
        return parse(TrainArgs, [*BASE, *flags], "train").blocks

    assert blocks() == {"vision": 6, "text": 3}
    assert blocks("--unfreeze-last-n", "2") == {"vision": 2, "text": 2}
    assert blocks("--unfreeze-last-n", "2", "--vision-blocks", "-1") == {"vision": -1, "text": 2}
    assert blocks("--text-blocks", "0") == {"vision": 6, "text": 0}
    assert parse(TrainArgs, [*BASE, "--config", "first-release"], "train").positives == "one"


def test_param_groups_give_each_tower_its_rate(dual_path) -> None:
    from train_contrastive.features import blocks_of
    from train_contrastive.freezing import apply_freezing
    from train_contrastive.optim import param_groups
    from vitrine.model.encoder import load_components

    model = load_components(str(dual_path))[0]
    starts = apply_freezing(
        model, lock_vision=False, lock_text=False, unfreeze_last_n={"vision": 1, "text": -1}
    )
    assert starts == {"vision": len(blocks_of(model.vision_model)) - 1, "text": 0}
    groups = param_groups(
        model, lr=1.0, head_lr=3.0, weight_decay=0.1, new_heads=True, tower_lr={"vision": 2.0, "text": 0.5}
    )
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in rate, name
            continue
        expected = 2.0 if name.startswith("vision_model.") else 0.5 if name.startswith("text_model.") else 3.0
        assert rate[id(param)] == expected, name


def test_vision_dropout_reaches_trainable_vision_blocks_only_and_only_in_training(dual_path) -> None:
    """``--vision-dropout``: the trainable blocks' dropout is set, frozen blocks and the text tower keep
    theirs; with the module in training mode two forwards differ, in eval mode they agree exactly."""
    from torch import nn

    from train_contrastive.features import blocks_of, replay_image_features
    from train_contrastive.model import ContrastiveModule, set_block_dropout
    from vitrine.model.encoder import load_components

    model = load_components(str(dual_path))[0]
    blocks = blocks_of(model.vision_model)
    start = len(blocks) - 1
    text_before = [m.p for m in model.text_model.modules() if isinstance(m, nn.Dropout)]
    assert set_block_dropout(model, "vision", start, 0.5) >= 1
    rates = [[m.p for m in b.modules() if isinstance(m, nn.Dropout)] for b in blocks]
    assert all(p == 0.5 for p in rates[start]) and not any(p for r in rates[:start] for p in r)
    assert [m.p for m in model.text_model.modules() if isinstance(m, nn.Dropout)] == text_before
    module = ContrastiveModule(model, {"vision": start, "text": 0}, cached=True)
    states = torch.randn(2, 5, model.vision_model.config.hidden_size)

    def twice() -> tuple[torch.Tensor, torch.Tensor]:
        return replay_image_features(model, states, start), replay_image_features(model, states, start)

    module.train()
    torch.manual_seed(0)
    assert not torch.equal(*twice())
    module.eval()
    assert torch.equal(*twice())


def test_vision_dropout_is_a_no_op_where_the_blocks_have_no_dropout_layer(clip_path) -> None:
    """CLIP's blocks have no dropout module (a default of 0.1 must not stop a CLIP fine-tune), nor has
    a locked tower a trainable block; out-of-range values are refused."""
    from train_contrastive.features import blocks_of
    from train_contrastive.model import set_block_dropout
    from vitrine.model.encoder import load_components

    model = load_components(str(clip_path))[0]
    assert set_block_dropout(model, "vision", 0, 0.1) == 0
    assert set_block_dropout(model, "text", len(blocks_of(model.text_model)), 0.1) == 0
    assert parse(TrainArgs, BASE, "train").vision_dropout == 0.1  # the default
    with pytest.raises(ValueError, match="vision-dropout"):
        parse(TrainArgs, [*BASE, "--vision-dropout", "1"], "train").validate()


def test_layer_decay_lowers_the_rate_block_by_block(dual_path) -> None:
    """Every tower weight trains; the top block keeps the tower's rate, each block below it gets half
    the rate of the one above, embeddings one step below the lowest block, final norms the full rate."""
    from train_contrastive.features import blocks_of, tower_of
    from train_contrastive.freezing import apply_freezing
    from train_contrastive.optim import param_groups
    from vitrine.model.encoder import load_components

    model = load_components(str(dual_path))[0]
    apply_freezing(model, lock_vision=False, lock_text=False, unfreeze_last_n={"vision": -1, "text": -1})
    groups = param_groups(
        model, lr=1.0, head_lr=3.0, weight_decay=0.1, new_heads=True, tower_lr={"text": 0.5}, layer_decay=0.5
    )
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert [g["lr"] for g in groups] == sorted(g["lr"] for g in groups)
    for side, top in (("vision", 1.0), ("text", 0.5)):
        tower = tower_of(model, side)
        blocks = blocks_of(tower)
        assert len(blocks) >= 2
        for i, block in enumerate(blocks):
            for param in block.parameters():
                assert rate[id(param)] == top * 0.5 ** (len(blocks) - 1 - i)
        for name, param in tower.named_parameters():
            if name.startswith("embeddings."):
                assert rate[id(param)] == top * 0.5 ** len(blocks), name
        after = [p for n, p in tower.named_parameters() if n.startswith("layernorm.") and p.requires_grad]
        assert all(rate[id(p)] == top for p in after)
    assert [p for n, p in model.vision_model.named_parameters() if n.startswith("layernorm.")]
    assert rate[id(model.visual_projection.weight)] == rate[id(model.logit_scale)] == 3.0


@pytest.mark.slow
def test_recipe_options_train_and_frozen_blocks_stay_frozen(towers_dir, tmp_path) -> None:
    """Every new option at once on the tiny towers (two blocks each): the vision tower trains its last
    block only, the text tower trains both at learning rate 0, so neither text block may move."""
    import json
    import sys

    from safetensors.torch import load_file

    from tests.train.conftest import FAST, run_module, tower_flags, write_pairs

    data, out = write_pairs(tmp_path / "pairs", copies=1), tmp_path / "out"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'positives = "all"\nqueue_size = 8\ntext_dropout = 0.2\nvision_blocks = 1\nhard_batches = 2\n'
        'vision_pooling = "mean"\nvision_dropout = 0.1\n'
    )
    run_module(
        [
            *(sys.executable, "-m", "train_contrastive", "train", *tower_flags(towers_dir), *FAST),
            *("--train-data", str(data), "--eval-data", str(data), "--output", str(out)),
            *("--config", str(recipe), "--text-blocks", "2", "--text-lr", "0"),
            *("--batch-size", "4", "--epochs", "2"),
        ]
    )
    report = json.loads((out / "train_report.json").read_text())
    assert report["args"]["positives"] == "all" and report["starts"] == {"vision": 1, "text": 0}
    assert report["args"]["hard_batches"] == 2 and report["pooling"] == {"vision": "mean", "text": "mean"}
    assert json.loads((out / "config.json").read_text())["vitrine_pooling"]["vision"] == "mean"
    assert report["recall_after"]["images"] == 8
    trained = load_file(out / "model.safetensors")
    vision = load_file(towers_dir[0] / "model.safetensors")
    text = load_file(towers_dir[1] / "model.safetensors")
    moved = {
        key: not torch.equal(trained[key], start[prefix + key.split(".", 1)[1]])
        for key in trained
        for side, start, prefix in (("vision_model.", vision, "vit."), ("text_model.", text, ""))
        if key.startswith(side + "encoder.layer.")
    }
    assert moved and not any(v for k, v in moved.items() if ".layer.0." in k or k.startswith("text_model."))
    assert any(v for k, v in moved.items() if k.startswith("vision_model.encoder.layer.1."))
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    negatives = [int(r.split(",")[header.index("negatives")]) for r in rows[1:]]
    # 4 images per step: 3 batch negatives, then the queue's 4, then 8 (less the caption's own image)
    assert negatives[:2] == [3, 7] and 10 <= max(negatives) <= 11, negatives


def test_the_queue_loss_learns_when_embeddings_are_free_parameters() -> None:
    """The loss and queue machinery, apart from any encoder: free image and caption embeddings that share
    a common component (as random heads give) reach near-perfect retrieval with 512 queued negatives. On a
    real model the queue did not train (docs/fine-tuning.md), and this keeps that failure on the dynamics of a
    shared, fast-moving encoder (MoCo's m = 0 case), not on the loss."""
    torch.manual_seed(0)
    n = 1000
    images = torch.nn.Parameter(torch.randn(n, 32) * 0.1 + 1.0)
    texts = torch.nn.Parameter(torch.randn(n, 32) * 0.1 + 1.0)
    optimizer = torch.optim.Adam([images, texts], lr=3e-2)
    queue = NegativeQueue(512)
    scale = torch.tensor(math.log(1 / 0.07))
    for _ in range(250):
        ids = torch.randperm(n)[:64]
        result = contrastive_loss(images[ids], texts[ids], scale, ids=ids, queue=queue.negatives())
        optimizer.zero_grad()
        result.backward_loss.backward()
        optimizer.step()
        queue.push(result.batch)
    assert result.negatives > 500  # the queue was used
    with torch.no_grad():
        a, b = torch.nn.functional.normalize(images, dim=1), torch.nn.functional.normalize(texts, dim=1)
        recall_at_1 = float(((b @ a.T).argmax(1) == torch.arange(n)).float().mean())
    assert recall_at_1 > 0.9


def test_vision_pooling_is_refused_for_a_trained_clip_family_start() -> None:
    """A CLIP-family checkpoint keeps the pooling it was trained with; only new dual encoders choose."""
    with pytest.raises(ValueError, match="--vision-pooling"):
        TrainArgs(model="m", train_data="d", output="o", vision_pooling="mean").validate()
    TrainArgs(vision_model="v", text_model="t", train_data="d", output="o", vision_pooling="mean").validate()
