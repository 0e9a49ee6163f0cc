"""`spbench` command line: one subcommand per module, each registered by its `register(subparsers)`."""
from __future__ import annotations

import argparse
import sys

from runtime.config import ConfigError
from runtime.data import DataError
from runtime.kernels import KernelError
from runtime.layout import LayoutError
from runtime.models import ModelError
from runtime.topology import TopologyError

from . import attncmd, faults, gate, gpucheck, maxlen, modelscmd, parity, report, traincmd
from .errors import UsageError
from .launch import RankError

SUBCOMMANDS = [traincmd, parity, faults, maxlen, attncmd, report, gate, modelscmd, gpucheck]
# Input errors raised anywhere below a subcommand: one line, exit 2.
INPUT_ERRORS = (UsageError, TopologyError, LayoutError, KernelError, ModelError, ConfigError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spbench", description=__doc__.splitlines()[0] if __doc__ else None)
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(subs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as e:
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
