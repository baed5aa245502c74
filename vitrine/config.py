"""Settings shared by every entry point, and typed-dataclass command lines.

Each entry point declares its arguments as a dataclass whose fields carry ``help`` (and optionally
``flag``, ``positional``, ``env``) in ``field(metadata=...)``; :func:`parse_args` builds the argparse
parser from it, so flags, types, defaults and help text are declared once. Environment variables
with the ``VITRINE_`` prefix supply defaults (``VITRINE_MODEL``, ``VITRINE_INDEX``, ``VITRINE_DEVICE``…),
and an explicit flag always wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

# Constants live here, not in the modules that use them, so that building a parser (``--help``) imports
# nothing heavy: this module must never import torch, transformers, faiss or gradio.
DEFAULT_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_INDEX = "vitrine-data/index"
ENV_PREFIX = "VITRINE_"
C = TypeVar("C")


def arg(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with command-line metadata: ``help``, ``flag`` (extra alias), ``positional``,
    ``env`` (environment variable name without prefix), ``choices``, ``nargs``, and for a renamed
    boolean ``old_flag`` / ``old_env``: the former names, still accepted with a deprecation warning."""
    factory = dataclasses.MISSING
    if isinstance(default, list):
        factory, default = (lambda d=default: list(d)), dataclasses.MISSING
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **meta})


def env_default(
    name: str, default: Any, environ: typing.Mapping[str, str] | None = None, old: str | None = None
) -> Any:
    """``VITRINE_<NAME>`` if set, else the deprecated ``VITRINE_<OLD>`` (with a warning), else ``default``."""
    environ = os.environ if environ is None else environ
    new_name, old_name = ENV_PREFIX + name.upper(), ENV_PREFIX + (old or "").upper()
    if new_name not in environ and old and old_name in environ:
        _deprecated(old_name, new_name)
        return environ[old_name]
    return environ.get(new_name, default)


def _deprecated(old: str, new: str) -> None:
    # One line on stderr, as argparse itself reports deprecated options from Python 3.13 on.
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class _DeprecatedSwitch(argparse.BooleanOptionalAction):
    """A former ``--flag`` / ``--no-flag`` pair, hidden from ``--help``, that warns and then sets the
    renamed option."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        negated = bool(option_string and option_string.startswith("--no-"))
        _deprecated(option_string or "", "--no-" + self.new[2:] if negated else self.new)
        super().__call__(parser, namespace, values, option_string)


@dataclasses.dataclass
class EncoderSettings:
    """How the encoder runs; shared by the indexer, the app and evaluation."""

    model: str | None = arg(
        None,
        "checkpoint: hub id or local folder (default: the index's own model, else "
        f"$VITRINE_MODEL, else {DEFAULT_MODEL})",
        env="MODEL",
    )
    device: str = arg("auto", "cpu, cuda, cuda:N or auto", env="DEVICE")
    batch_size: int = arg(
        32, "images per model forward: larger is faster until memory runs out", env="BATCH_SIZE"
    )
    num_workers: int = arg(
        0,
        "threads decoding and preprocessing images while the model runs (0: split the CPU cores between "
        "them and the model as measured while indexing)",
        env="NUM_WORKERS",
    )

    runtime: str | None = arg(
        None,
        "what runs the towers: torch, onnx (ONNX Runtime) or openvino (default: the index's own, else torch)",
        env="RUNTIME",
        choices=["torch", "onnx", "openvino"],
    )
    precision: str | None = arg(
        None,
        "fp32, bf16, int8 (image tower calibrated on the catalog and validated against fp32), or auto: "
        "the fastest validated one on this machine (default: the index's own, else auto)",
        env="PRECISION",
        choices=["auto", "fp32", "bf16", "int8"],
    )

    def encoder_kwargs(self) -> dict[str, Any]:
        kwargs = {"device": self.device, "batch_size": self.batch_size, "num_workers": self.num_workers}
        runtime = {"runtime": self.runtime, "precision": self.precision}
        return {**kwargs, **{k: v for k, v in runtime.items() if v is not None}}


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``2d`` (how ``--window`` and ``--every`` read).

    Raises ValueError naming the accepted forms.
    """
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    try:
        seconds = float(value[:-1] if unit else value) * (unit or 1.0)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number with s, m, h or d (e.g. 1h)")
    return seconds


def quiet_libraries() -> None:
    """Silence transformers' load reports and progress bars (entry points call this once).

    Environment variables, not transformers calls, so that an entry point stays light until a command
    needs the model (``--help`` must not import transformers); both libraries read them at import.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:  # already imported (in-process callers): the variables came too late
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _unwrap(tp: Any) -> tuple[type, bool]:
    """(base type, optional?) for annotations like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0])[0], True
    if origin in (list, Sequence):
        return typing.get_args(tp)[0], False
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per dataclass field (``snake_case`` → ``--snake-case``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        base, _ = _unwrap(hints[f.name])
        default = (
            None
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )
        if meta.get("env"):
            default = env_default(meta["env"], default, old=meta.get("old_env"))
            if base is bool and isinstance(default, str):  # VITRINE_ADMIN=0 must mean False
                default = default.strip().lower() in ("1", "true", "yes", "on")
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": default}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        is_list = typing.get_origin(hints[f.name]) is list
        if base is bool and not meta.get("positional"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base if base in (int, float, str) else str
            if is_list:
                kwargs["nargs"] = meta.get("nargs", "+" if meta.get("positional") else "*")
        if kwargs["help"] and default not in (None, [], False):
            kwargs["help"] += " (default: %(default)s)"
        if meta.get("positional"):
            if f.default is not dataclasses.MISSING and not is_list:
                kwargs["nargs"] = "?"  # optional positional keeps its default
            elif not is_list:
                kwargs.pop("default")
            parser.add_argument(f.name, **kwargs)
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
            kwargs.pop("default")
        names = ["--" + f.name.replace("_", "-")] + ([meta["flag"]] if meta.get("flag") else [])
        parser.add_argument(*names, dest=f.name, **kwargs)
        if meta.get("old_flag"):
            _add_old_flag(parser, meta["old_flag"], names[0], f.name, base)


def _add_old_flag(parser: argparse.ArgumentParser, old: str, new: str, dest: str, base: type) -> None:
    if base is not bool:
        raise TypeError(f"old_flag is supported for boolean options only, not {dest}")
    parser.add_argument(
        old, dest=dest, action=_DeprecatedSwitch, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def parse_args(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Parse ``argv`` into an instance of the dataclass ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))
