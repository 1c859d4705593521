"""`harness` command line: parsing only, then one call per subcommand."""
from __future__ import annotations

import argparse
import json
import sys

from models import registry


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def cmd_models(args) -> int:
    names = args.model or registry.names()
    for name in names:
        registry.get(name)  # unknown model: UnknownModelError naming the valid ones
    if args.preset:
        for name in names:
            registry.get_config(name, args.preset)
    rows = [r for r in registry.table(args.seq_len) if r["model"] in names and (not args.preset or r["preset"] == args.preset)]
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return 0
    header = ["model", "preset", "layers", "width", "params", "non-emb", "published", "seq_len", "FLOPs/token"]
    table = [header] + [[r["model"], r["preset"], str(r["layers"]), str(r["width"]), _human(r["params"]),
                         _human(r["non_embedding"]), _human(r["published"]) if r["published"] else "-",
                         str(r["seq_len"]), _human(r["flops_per_token"])] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nFLOPs/token: training (forward + backward = 3 x forward) at seq_len, attention over the full S x S "
          "matrix (PaLM convention); params: tied weights counted once; non-emb: without token/position "
          "embeddings and an untied head.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark and evaluation harness for LM architectures")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list the model registry with parameter and FLOP counts")
    m.add_argument("--model", action="append", help="only this architecture (repeatable)")
    m.add_argument("--preset", help="only this preset")
    m.add_argument("--seq-len", type=int, default=None, help="quote FLOPs at this context (default: each preset's)")
    m.add_argument("--format", choices=["table", "json"], default="table")
    m.set_defaults(func=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (registry.UnknownModelError, ValueError) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
