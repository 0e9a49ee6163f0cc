"""`spbench models`: the model presets shipped with spbench (architecture configs; random weights)."""
from __future__ import annotations

import json

from runtime.models import presets

EPILOG = "example:\n  spbench models --json"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the preset table as JSON")


def run(args) -> int:
    from ..memory.setup import shape_of  # the one parameter count (the memory model's)

    table = presets()
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{'preset':<15}{'params':>9}{'layers':>8}{'hidden':>8}{'heads':>7}{'kv':>4}{'vocab':>9}")
    for name, c in table.items():
        print(f"{name:<15}{shape_of(name).params / 1e9:>8.2f}B{c['num_hidden_layers']:>8}{c['hidden_size']:>8}"
              f"{c['num_attention_heads']:>7}{c['num_key_value_heads']:>4}{c['vocab_size']:>9}")
    return 0
