"""bench/finetune.py --recipes: the sweep runner, smoke-tested on tiny towers (two recipes × two seeds,
two steps each); the real sweep takes hours of CPU and is not run by the tests."""

from __future__ import annotations

import pytest

from tests.train.conftest import FAST, write_pairs


@pytest.mark.slow
def test_sweep_runs_each_recipe_and_seed_with_the_default_as_baseline(towers_dir, tmp_path, capsys) -> None:
    from bench.finetune import main

    data = write_pairs(tmp_path / "pairs", copies=1)
    flags = " ".join([*FAST, "--projection-dim", "32", "--batch-size", "4", "--max-steps", "2"])
    code = main(
        [
            *("--vision-model", str(towers_dir[0]), "--text-model", str(towers_dir[1])),
            *("--train-data", str(data), "--eval-data", str(data), "--output", str(tmp_path / "sweep")),
            *("--recipes", "siglip", "--seeds", "0,1", "--train-flags", flags),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    per_recipe, per_run = out.split("Per run:")
    rows = [line for line in per_run.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert [r.split("|")[1:3] for r in rows] == [
        [" default ", " 0    "],
        [" siglip  ", " 0    "],
        [" default ", " 1    "],
        [" siglip  ", " 1    "],
    ], rows
    table = [line.split("|") for line in per_recipe.splitlines() if line.startswith("| ")]
    summary = {cells[1].strip(): cells for cells in table}
    assert summary["default"][2].strip() == "2" and summary["siglip"][9].strip() != "—"  # Δ vs default
    assert "±" in summary["siglip"][3] and "--config RECIPE --seed SEED" in out
    for name in ("default-seed0", "siglip-seed1"):
        assert (tmp_path / "sweep" / name / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_second_sweep_reuses_recorded_runs_and_trains_only_new_ones(towers_dir, tmp_path, capsys) -> None:
    """A sweep of hours must survive a stop: the same sweep again trains only what is not recorded."""
    from bench.finetune import main

    data = write_pairs(tmp_path / "pairs", copies=1)
    flags = " ".join([*FAST, "--projection-dim", "32", "--batch-size", "4", "--max-steps", "2"])
    argv = [
        *("--vision-model", str(towers_dir[0]), "--text-model", str(towers_dir[1])),
        *("--train-data", str(data), "--eval-data", str(data), "--output", str(tmp_path / "sweep")),
        *("--train-flags", flags),
    ]
    assert main([*argv, "--recipes", "siglip", "--seeds", "0"]) == 0
    first = capsys.readouterr()
    weights = tmp_path / "sweep" / "siglip-seed0" / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    assert main([*argv, "--recipes", "siglip,hardest", "--seeds", "0"]) == 0
    second = capsys.readouterr()
    assert "siglip seed 0: recorded" in second.err and "default seed 0: recorded" in second.err
    assert "hardest seed 0 (load" in second.err  # the new recipe trained
    assert weights.stat().st_mtime_ns == trained
    assert first.out.split("Per run:")[1].splitlines()[3] in second.out  # the same row, reused
    assert main([*argv, "--recipes", "siglip", "--seeds", "0", "--train-flags", f"{flags} --lr 1e-4"]) == 0
    assert "siglip seed 0 (load" in capsys.readouterr().err  # another command: trained again


def test_a_record_is_reused_only_for_the_same_command_and_recipe_content(tmp_path) -> None:
    from bench import sweep

    out = tmp_path / "siglip-seed0"
    out.mkdir()
    command = sweep.train_command("siglip", 0, out, ["--epochs", "1"])
    recall = {"t2i": {"R@1": 1.0}, "i2t": {"R@1": 1.0}}
    result = sweep.RunResult("siglip", 0, recall, 1.0, 0.0, 1.0, 1.0, 2, command, sweep.recipe_sha("siglip"))
    sweep.record(result, out)
    assert sweep.recorded(out, command, "siglip") == result
    assert sweep.recorded(out, sweep.train_command("siglip", 0, out, ["--epochs", "2"]), "siglip") is None
    stale = sweep.RunResult("siglip", 0, recall, 1.0, 0.0, 1.0, 1.0, 2, command, "0" * 16)  # edited since
    sweep.record(stale, out)
    assert sweep.recorded(out, command, "siglip") is None
    (out / sweep.RECORD).write_text("{not json")
    assert sweep.recorded(out, command, "siglip") is None
