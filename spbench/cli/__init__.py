"""`spbench` command line: one thin module per command, imported only when that command runs.

Each command module has `add_arguments(parser)` and `run(args) -> int`, and its docstring is the command's
description (`EPILOG`, when it has one, holds examples). So `spbench gate` and `spbench report` start without
importing torch; `spbench --help` imports no command at all.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from runtime.errors import InputError

from ..common.errors import RankError

COMMANDS = {
    "train": ("train", "train (SFT or DPO) with sequence parallelism"),
    "parity": ("parity", "SP on vs off: loss, grad-norm, per-parameter grads, DPO quantities"),
    "faults": ("faults", "inject each known SP bug (FAULTS.md) and show which check catches it"),
    "maxlen": ("maxlen", "longest trainable sequence per model and stage (measured or estimated)"),
    "cost": ("cost", "one step per rank on fake tensors: traced peak vs model, FLOPs/ideal, bytes/minimum, balance"),
    "check-attention": ("check_attention", "check an SP attention strategy against a single-process oracle"),
    "report": ("report", "render results files as Markdown tables and PNG plots"),
    "gate": ("gate", "fail (exit 1) when parity results regress against a baseline"),
    "compare": ("compare", "other SP implementations through the parity harness: pass / wrong / refused per case"),
    "models": ("models", "list model presets"),
    "gpu-check": ("gpu_check", "one prepared run of GPU checks on one H100/H200 within a time budget"),
}
"""Command name → (module in spbench.cli, one-line help)."""


def _command_in(argv: list[str]) -> str | None:
    """The command named in `argv` (its first word that is not an option), if it is a known one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command `argv` names (only that module is imported)."""
    parser = argparse.ArgumentParser(prog="spbench", description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _command_in(argv or [])
    for name, (module_name, help_text) in COMMANDS.items():
        if name != chosen:
            subs.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"{__name__}.{module_name}")
        p = subs.add_parser(name, help=help_text, description=module.__doc__,
                            epilog=getattr(module, "EPILOG", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # `train CFG --nproc 2 key=value`: overrides may follow the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except InputError as e:  # bad input anywhere below a command: one line, exit 2
        print(f"spbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"spbench {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spbench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
