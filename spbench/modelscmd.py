"""`spbench models`: the model presets shipped with spbench (architecture configs; random weights)."""
from __future__ import annotations

import argparse
import json

from runtime.models import presets


def register(subs) -> None:
    p = subs.add_parser("models", help="list model presets", description=__doc__,
                        epilog="example:\n  spbench models --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the preset table as JSON")
    p.set_defaults(func=run)


def parameters(cfg: dict) -> int:
    """Parameter count of a preset (embeddings, attention, MLP, norms, untied head)."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    bias = (h + 2 * kv) if cfg["architecture"] == "qwen2" else 0  # qwen2 has q/k/v biases
    layer = h * h + 2 * h * kv + h * h + bias + 3 * h * i + 2 * h
    return v * h * (1 if cfg["tie_word_embeddings"] else 2) + n * layer + h


def run(args) -> int:
    table = presets()
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{'preset':<15}{'params':>9}{'layers':>8}{'hidden':>8}{'heads':>7}{'kv':>4}{'vocab':>9}")
    for name, c in table.items():
        print(f"{name:<15}{parameters(c) / 1e9:>8.2f}B{c['num_hidden_layers']:>8}{c['hidden_size']:>8}"
              f"{c['num_attention_heads']:>7}{c['num_key_value_heads']:>4}{c['vocab_size']:>9}")
    return 0
