"""Command lines built from dataclasses: a renamed option keeps working under its old name, with a warning."""

from __future__ import annotations

import pytest

from app.cli import AppArgs
from vitrine.config import parse_args


def _torchscript(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    args = parse_args(AppArgs, argv)
    return args.torchscript, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITRINE_TORCHSCRIPT", raising=False)
    monkeypatch.delenv("VITRINE_TRACE", raising=False)


def test_torchscript_is_on_by_default_and_the_flag_turns_it_off(capsys):
    assert _torchscript([], capsys) == (True, "")
    assert _torchscript(["--no-torchscript"], capsys) == (False, "")
    assert _torchscript(["--torchscript"], capsys) == (True, "")


@pytest.mark.parametrize(
    ("argv", "value", "warning"),
    [
        (["--no-trace"], False, "warning: --no-trace is deprecated; use --no-torchscript\n"),
        (["--no-torchscript", "--trace"], True, "warning: --trace is deprecated; use --torchscript\n"),
    ],
)
def test_old_trace_flag_still_works_and_warns(argv, value, warning, capsys):
    assert _torchscript(argv, capsys) == (value, warning)


def test_environment_variable_and_its_deprecated_alias(monkeypatch, capsys):
    monkeypatch.setenv("VITRINE_TRACE", "0")
    warning = "warning: VITRINE_TRACE is deprecated; use VITRINE_TORCHSCRIPT\n"
    assert _torchscript([], capsys) == (False, warning)
    monkeypatch.setenv("VITRINE_TORCHSCRIPT", "1")  # the new name wins, and silences the warning
    assert _torchscript([], capsys) == (True, "")
    monkeypatch.delenv("VITRINE_TRACE")
    monkeypatch.setenv("VITRINE_TORCHSCRIPT", "off")
    assert _torchscript([], capsys) == (False, "")


def test_the_old_flag_is_hidden_from_help(capsys):
    with pytest.raises(SystemExit, match=r"^0$"):
        parse_args(AppArgs, ["--help"])
    out = capsys.readouterr().out
    assert "--torchscript" in out and "--trace" not in out
