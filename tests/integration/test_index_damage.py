"""A damaged index directory gets one diagnosis from every command and a way out (`indexer repair`);
nothing downloads a model, nothing deletes generations, SQLite data is never lost; takedowns stay down.
Real tiny models, real FAISS and SQLite, the real command line (in process, and one real subprocess)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from indexer.cli import main
from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import indexer

OFFLINE = {"HF_HUB_OFFLINE": "1", "VITRINE_MODEL": ""}


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def photos(folder: Path, start: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        pattern_image(i).save(folder / f"img_{i:03d}.jpg", quality=90)
    return folder


def items(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in conn.execute("SELECT key FROM items"))
    finally:
        conn.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Path:
    """An index with two published generations, a reference, drift journal and reindex log."""
    base = tmp_path_factory.mktemp("pristine")
    index = base / "index"
    catalog = photos(base / "a", 0, 8)
    assert (
        main(["build", str(catalog), "--index", str(index), "--model", str(clip_path), "--no-progress"]) == 0
    )
    assert main(["reindex", "--index", str(index)]) == 0
    assert (index / "CURRENT").read_text() == "gen-000002"
    return index


def copy(pristine: Path, tmp_path: Path) -> Path:
    index = tmp_path / "index"
    shutil.copytree(pristine, index)
    return index


# --------------------------------------------------------------------------- item 9
def test_lost_current_is_refused_then_repaired_and_history_survives(clip_path, tmp_path):
    index = str(tmp_path / "index")
    a, b = photos(tmp_path / "a", 0, 6), photos(tmp_path / "b", 20, 4)
    indexer("build", str(a), "--index", index, "--model", str(clip_path), "--no-progress")
    Path(index, "CURRENT").unlink()
    out = indexer("build", str(b), "--index", index, "--model", str(clip_path), "--no-progress", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "CURRENT is missing" in lines[0] and "indexer repair" in lines[0] and "gen-000001" in lines[0]
    assert len(items(Path(index, "gen-000001", "meta.sqlite"))) == 6  # the old code pruned it here
    repaired = indexer("repair", "--index", index)
    assert "made gen-000001 live again" in repaired.stdout
    indexer("build", str(b), "--index", index, "--no-progress")
    status = indexer("status", "--index", index, "--json")
    assert '"count": 10' in status.stdout


# --------------------------------------------------------------------------- item 11
DAMAGE = {
    "empty CURRENT": (lambda i: (i / "CURRENT").write_text(""), "CURRENT is empty"),
    "CURRENT names a missing generation": (
        lambda i: (i / "CURRENT").write_text("gen-000009"),
        "CURRENT names gen-000009, which does not exist",
    ),
    "manifest deleted": (
        lambda i: (i / "gen-000002" / "manifest.json").unlink(),
        "gen-000002/manifest.json is missing or unreadable",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_command_gives_the_same_diagnosis_and_repair_fixes_it(pristine, tmp_path, capsys, case):
    index = copy(pristine, tmp_path)
    damage, reason = DAMAGE[case]
    damage(index)
    photos_b = photos(tmp_path / "b", 30, 2)
    commands = [
        ["status", "--index", str(index)],
        ["build", str(photos_b), "--index", str(index), "--no-progress"],
        ["search", "--index", str(index), "--text", "stripes"],
        ["remove", "--index", str(index), str(photos_b)],
        ["reindex", "--index", str(index)],
        ["drift", "--index", str(index)],
    ]
    lines = set()
    for command in commands:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in OFFLINE.items():
                mp.setenv(k, v)
            code, _, err = run(capsys, *command)
        assert code == 1 and err.count("\n") == 1 and err.startswith("error:"), (command, err)
        lines.add(err)
    assert len(lines) == 1 and reason in lines.pop()  # one diagnosis, no model download attempted
    code, out, err = run(capsys, "repair", "--index", str(index))
    assert code == 0 and out.strip(), err
    code, out, err = run(capsys, "status", "--index", str(index), "--json")
    assert code == 0 and '"count": 8' in out and '"snapshot_damage": []' in out, err


# --------------------------------------------------------------------------- corruption battery
def index_files(index: Path) -> list[str]:
    return sorted(str(p.relative_to(index)) for p in index.rglob("*") if p.is_file())


def test_corruption_battery_status_diagnoses_and_sqlite_is_never_lost(pristine, tmp_path, capsys):
    files = index_files(pristine)
    assert {"CURRENT", "HISTORY", "gen-000002/manifest.json", "gen-000002/meta.sqlite"} <= set(files)
    assert any(f.endswith(".faiss") for f in files) and "reindex.jsonl" in files
    before = {f: items(pristine / f) for f in files if f.endswith("meta.sqlite")}
    for name in files:
        for how in ("delete", "truncate", "garble"):
            index = copy(pristine, tmp_path / f"{name.replace('/', '_')}-{how}")
            target = index / name
            if how == "delete":
                target.unlink()
            elif how == "truncate":
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
            else:
                data = bytearray(target.read_bytes())
                mid = len(data) // 2
                data[mid : mid + 16] = b"\xa5" * min(16, len(data) - mid) if data else b""
                target.write_bytes(bytes(data) if data else b"\xa5garbage")
            code, _, err = run(capsys, "status", "--index", str(index), "--json")
            context = f"{how} {name}: {err}"
            assert code in (0, 1) and "Traceback" not in err, context
            if code == 1:
                assert err.count("\n") == 1 and err.startswith("error:") and "damaged" in err, context
            run(capsys, "repair", "--index", str(index))
            for db, keys in before.items():  # every other meta.sqlite keeps every item
                if db != name:
                    assert items(index / db) == keys, context
            shutil.rmtree(index.parent)


# --------------------------------------------------------------------------- item 13
def test_removed_paths_stay_out_of_builds_and_reindexes_until_restored(clip_path, tmp_path, capsys):
    index, folder = str(tmp_path / "index"), photos(tmp_path / "photos", 0, 6)
    (folder / "sub").mkdir()
    pattern_image(50).save(folder / "sub" / "x.jpg")
    build = ["build", str(folder), "--index", index, "--model", str(clip_path), "--no-progress", "--json"]
    assert run(capsys, *build)[0] == 0
    gone = [str((folder / "img_002.jpg").resolve()), str((folder / "sub").resolve())]
    code, out, _ = run(capsys, "remove", "--index", index, *gone)
    assert code == 0 and out.startswith("removed 2 items")

    def keys() -> set[str]:
        code, out, err = run(capsys, "status", "--index", index, "--json")
        assert code == 0, err
        import json

        status = json.loads(out)
        assert status["excluded"] in (sorted(gone), [])  # [] once restored
        return {Path(k).name for k in items(Path(index) / status["generation"] / "meta.sqlite")}

    assert run(capsys, *build)[0] == 0 and {"img_002.jpg", "x.jpg"}.isdisjoint(keys())
    assert run(capsys, "reindex", "--index", index)[0] == 0 and {"img_002.jpg", "x.jpg"}.isdisjoint(keys())
    assert run(capsys, *build)[0] == 0 and {"img_002.jpg", "x.jpg"}.isdisjoint(keys())
    code, out, err = run(capsys, "restore", "--index", index, *gone)
    assert code == 0 and out.startswith("restored 2 of 2"), err
    assert run(capsys, *build)[0] == 0 and {"img_002.jpg", "x.jpg"} <= keys()
