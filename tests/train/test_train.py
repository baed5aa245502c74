"""End-to-end fine-tuning on tiny real towers, through the command line users run."""

from __future__ import annotations

import csv
import json
import math
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import FAST, accelerate_launch, run_module, tower_flags, write_pairs
from train_contrastive.loss import LOSSES

TRAIN = [sys.executable, "-m", "train_contrastive", "train"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cached_training_learns_and_output_loads(towers_dir, pairs_dir, tmp_path) -> None:
    out = tmp_path / "out"
    stdout = run_module(
        [
            *TRAIN,
            *tower_flags(towers_dir),
            *FAST,
            "--train-data",
            str(pairs_dir),
            "--eval-data",
            str(pairs_dir),
            "--output",
            str(out),
            "--unfreeze-last-n",
            "1",
            "--batch-size",
            "8",
            "--epochs",
            "12",
        ]
    )
    report = json.loads((out / "train_report.json").read_text())
    assert report["cached"] is True and report["starts"] == {"vision": 1, "text": 1}
    assert report["train_skipped"] == 1 and report["train_pairs"] == 16  # broken.jpg counted, not fatal
    losses = [float(r["loss"]) for r in _rows(out / "metrics.csv")]
    assert sum(losses[-4:]) / 4 < 0.8 * (sum(losses[:4]) / 4), losses
    before, after = report["recall_before"], report["recall_after"]
    assert after["t2i"]["R@5"] > before["t2i"]["R@5"] + 10, (before, after)
    assert "before:" in stdout and (out / "curves.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "## Recall" in card and "| after |" in card and '"lr": 0.001' in card

    # the folder is a plain save_pretrained checkpoint: the serving encoder gives the trained recall
    from vitrine.catalog.readers import open_catalog
    from vitrine.evaluate import evaluate_catalog
    from vitrine.model.encoder import Encoder

    served = evaluate_catalog(Encoder.from_pretrained(str(out), device="cpu"), open_catalog(pairs_dir))
    assert served.t2i == pytest.approx(after["t2i"], abs=4.0)  # cache stores float16 activations

    index = tmp_path / "index"
    build = run_module(
        [
            sys.executable,
            "-m",
            "indexer",
            "build",
            str(pairs_dir),
            "--index",
            str(index),
            "--model",
            str(out),
            "--json",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    built = json.loads(build.splitlines()[-1])
    assert built["failed"] >= 1 and built["added"] == 16, built


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        [],
        ["--positives", "all", "--queue-size", "8", "--text-dropout", "0.2"],
        # one block per tower trains, so the frozen-layer cache (which --hard-batches needs) applies
        ["--ema", "0.9", "--hard-batches", "2", "--mirror", "--vision-blocks", "1", "--text-blocks", "1"],
    ],
    ids=["default", "all-captions-queue-text-dropout", "cached-ema-hard-batches-mirror"],
)
def test_resume_reproduces_the_uninterrupted_run(options, towers_dir, tmp_path) -> None:
    data = write_pairs(tmp_path / "pairs", copies=2)
    common = [
        *options,
        *tower_flags(towers_dir),
        *FAST,
        "--train-data",
        str(data),
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--unfreeze-last-n",
        "-1",
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "5",
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_module([*TRAIN, *common, "--output", str(full)])
    checkpoint = full / "checkpoints" / "step-0000003"  # mid-epoch: 4 steps per epoch
    run_module([*TRAIN, *common, "--output", str(resumed), "--resume", str(checkpoint)])
    a, b = _rows(full / "metrics.csv"), _rows(resumed / "metrics.csv")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-6, abs=1e-7), (a, b)
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_gathered_loss_equals_one_process_on_the_whole_batch(tmp_path) -> None:
    from tests.train.conftest import REPO

    run_module(
        [
            *accelerate_launch(2),
            "--main_process_port",
            str(_free_port()),
            str(REPO / "tests" / "train" / "dist_loss_check.py"),
            str(tmp_path),
        ],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, loss in [*LOSSES.items(), *((f"{n}:all", f) for n, f in LOSSES.items())]:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(8, 16, generator=generator).requires_grad_(True)
        texts = torch.randn(8, 16, generator=generator).requires_grad_(True)
        two_each = torch.randn(16, 16, generator=generator).requires_grad_(True)
        scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
        multi = name.endswith(":all")  # two captions per image: the owner links cross the processes
        captions = two_each if multi else texts
        links = {"owner": torch.arange(8).repeat_interleave(2)} if multi else {}
        whole = loss(images, captions, scale, bias, margin=0.5, **links)
        whole.loss.backward()
        for r, payload in enumerate(p[name] for p in ranks):
            assert payload["world"] == 2 and payload["negatives"] == 7, name  # 8 - 1: both processes' pairs
            assert payload["loss"] == pytest.approx(float(whole.loss.detach()), rel=1e-5), name
            rows = slice(4 * r, 4 * r + 4)
            text_rows = slice(8 * r, 8 * r + 8) if multi else rows
            for side, full in (("image_grad", images.grad[rows]), ("text_grad", captions.grad[text_rows])):
                torch.testing.assert_close(torch.tensor(payload[side]), full, rtol=1e-4, atol=1e-6)
        for param, key in ((scale, "scale_grad"), (bias, "bias_grad")):  # DDP's average over processes
            if param.grad is None:
                assert all(p[name][key] is None for p in ranks), (name, key)
                continue
            averaged = sum(p[name][key] for p in ranks) / 2
            assert averaged == pytest.approx(float(param.grad), rel=1e-5), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["infonce", "siglip", "hardest", "infonce-all-queue"])
def test_two_process_cpu_training(loss, towers_dir, tmp_path) -> None:
    """Each loss on two CPU processes; ``infonce-all-queue`` adds all captions and a queue of 8."""
    pairs_dir = write_pairs(tmp_path / "pairs")  # no bad file: every global batch is full
    out = tmp_path / "out"
    run_module(
        [
            *accelerate_launch(2),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "train_contrastive",
            "train",
            *tower_flags(towers_dir),
            *FAST,
            "--train-data",
            str(pairs_dir),
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--loss",
            loss.split("-")[0],
            *(["--positives", "all", "--queue-size", "8"] if loss.endswith("queue") else []),
        ],
        env={"ACCELERATE_USE_CPU": "true"},
    )
    report = json.loads((out / "train_report.json").read_text())
    assert report["processes"] == 2
    negatives = [int(r["negatives"]) for r in _rows(out / "metrics.csv")]
    if loss.endswith("queue"):  # the global batch's 7, then the queue's 8 less the caption's own image
        assert negatives[0] == 7 and max(negatives) in (14, 15), negatives
    else:
        assert negatives and set(negatives) == {7}, negatives  # 2 processes × 4 pairs - 1
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_config_file_and_wise_alpha_zero_restores_start(towers_dir, tmp_path) -> None:
    data = write_pairs(tmp_path / "pairs", copies=1)
    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"train-data: {data}\nepochs: 1\nbatch_size: 4\nwise_alpha: 0.0\nunfreeze_last_n: 1\naugment: true\n"
    )
    out = tmp_path / "out"
    run_module([*TRAIN, "--config", str(config), *tower_flags(towers_dir), *FAST, "--output", str(out)])
    report = json.loads((out / "train_report.json").read_text())
    assert report["args"]["epochs"] == 1 and report["args"]["wise_alpha"] == 0.0 and report["steps"] == 2
    assert report["cached"] is False  # augmentation changes pixels every epoch: nothing to cache
    from transformers import AutoModel

    trained = AutoModel.from_pretrained(out).vision_model.state_dict()
    start = AutoModel.from_pretrained(towers_dir[0]).state_dict()
    compared = [k for k in start if "pooler" not in k]
    assert len(compared) > 10
    for key in compared:  # the towers trained, and alpha = 0 put every weight back
        torch.testing.assert_close(trained[key], start[key])


def test_resume_without_eval_data_finishes(towers_dir, tmp_path) -> None:
    """A run measured on --eval-data and resumed without it keeps its "before" and ends cleanly."""
    data = write_pairs(tmp_path / "pairs", copies=1)
    out = tmp_path / "out"
    common = [*TRAIN, *tower_flags(towers_dir), *FAST, "--train-data", str(data), "--output", str(out)]
    common += ["--batch-size", "4", "--epochs", "2", "--checkpoint-every", "1"]
    run_module([*common, "--eval-data", str(data), "--max-steps", "1"])
    stdout = run_module([*common, "--resume", "latest"])
    assert "before: " in stdout and "after: " not in stdout and "saved " in stdout, stdout
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 4 and report["recall_after"] is None


def test_early_stopping_on_eval_recall(towers_dir, tmp_path) -> None:
    data = write_pairs(tmp_path / "pairs", copies=1)
    out = tmp_path / "out"
    run_module(
        [
            *TRAIN,
            *tower_flags(towers_dir),
            *FAST,
            "--train-data",
            str(data),
            "--eval-data",
            str(data),
            "--output",
            str(out),
            "--batch-size",
            "4",
            "--epochs",
            "6",
            "--patience",
            "1",
            "--lr",
            "0",
            "--head-lr",
            "0",
        ]
    )
    report = json.loads((out / "train_report.json").read_text())
    # nothing can improve with a zero learning rate: the 2nd evaluation is not better, so training stops
    assert report["stop_reason"].startswith("no better recall") and report["steps"] == 4
    assert len(_rows(out / "eval.csv")) == 3  # before + 2 epochs


def test_errors_are_one_line(towers_dir, tmp_path, capsys) -> None:
    from train_contrastive.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text('{"no_such_setting": 1}')
    base = ["train", *tower_flags(towers_dir), "--output", str(tmp_path / "o")]
    for extra, message in (
        (["--config", str(bad), "--train-data", "x"], "unknown setting(s)"),
        (["--train-data", str(tmp_path / "missing.csv")], "catalog not found"),
        (["--train-data", str(tmp_path), "--batch-size", "1"], "at least 2"),
        (["--train-data", str(tmp_path), "--loss", "hardest", "--margin", "0"], "--margin must be"),
    ):
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err


@pytest.mark.parametrize("loss", ["siglip", "hardest"])
def test_each_loss_trains_the_tiny_model(loss, towers_dir, tmp_path) -> None:
    data = write_pairs(tmp_path / "pairs", copies=1)
    out = tmp_path / "out"
    flags = ["--batch-size", "4", "--epochs", "6", "--unfreeze-last-n", "1", "--head-lr", "2e-2"]
    flags += ["--output", str(out), "--checkpoint-every", "0", "--train-data", str(data)]
    run_module([*TRAIN, *tower_flags(towers_dir), *FAST, *flags, "--loss", loss])
    report = json.loads((out / "train_report.json").read_text())
    assert report["args"]["loss"] == loss and report["steps"] == 12
    rows = _rows(out / "metrics.csv")
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    state = load_file(next((out / "checkpoints").iterdir()) / "model.safetensors")
    if loss == "siglip":  # starts at t = 0.1, b = -10 (SigLIP); both learnt, the bias kept in the state
        assert float(state["logit_bias"]) != -10.0
        assert float(rows[0]["logit_scale"]) == pytest.approx(math.log(10), abs=0.05)  # after one step
        assert report["temperature"] != pytest.approx(0.1, abs=1e-6)
    else:  # no temperature in VSE++'s loss: it stays frozen at its start
        assert report["temperature"] == pytest.approx(0.07, rel=1e-5)
        assert "logit_bias" not in state
