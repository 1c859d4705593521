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


def _parse_sets(items: list[str] | None) -> dict:
    """--set a.b=value (value parsed as YAML) -> {"a": {"b": value}}."""
    import yaml

    from .config import ConfigError
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def cmd_train(args) -> int:
    from dataclasses import asdict

    from .config import TrainConfig, from_dict, load_yaml, merge
    from .train.loop import train
    settings = load_yaml(args.config) if args.config else {}
    flags = {k: v for k, v in {"model": args.model, "preset": args.preset, "seed": args.seed,
                               "seq_len": args.seq_len, "batch_size": args.batch_size}.items() if v is not None}
    budget = {k: v for k, v in {"steps": args.steps, "tokens": args.tokens, "flops": args.flops}.items() if v is not None}
    if budget:
        flags["budget"] = budget
    if args.lr is not None:
        flags["optim"] = {"lr": args.lr}
    settings = merge(merge(settings, flags), _parse_sets(args.set))
    if budget:
        settings["budget"] = budget
    cfg = from_dict(TrainConfig, settings).validate()
    from models import registry
    registry.get_config(cfg.model, cfg.preset, **cfg.model_overrides)
    summary = train(cfg, args.out, resume=not args.restart)
    keys = ("steps", "tokens", "flops", "val_loss", "val_bpb", "val_ppl", "wall_time_s", "tokens_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    return 0


def cmd_run(args) -> int:
    from . import store
    from .matrix import load_matrix, run_matrix
    from .report import write_report
    matrix = load_matrix(args.matrix, _parse_sets(args.set))
    if args.list:
        for cell in matrix.cells:
            print(cell.cell_id)
        return 0
    root = args.out or store.DEFAULT_ROOT
    print(f"matrix {matrix.name}: {len(matrix.cells)} cell(s) from {matrix.source} -> {root}/{matrix.name}")
    records = run_matrix(matrix, root, force=args.force)
    report = write_report(f"{root}/{matrix.name}")
    print()
    print(report.read_text().split("\n![")[0])
    print(f"report: {report}")
    return 1 if any(r.get("status") == "failed" for r in records) else 0


def cmd_report(args) -> int:
    from . import store
    from .report import write_report
    root = args.results or store.DEFAULT_ROOT
    path = write_report(root, args.out)
    print(path.read_text().split("\n![")[0])
    print(f"report: {path}")
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

    t = sub.add_parser("train", help="train one model (the loop every matrix cell uses)")
    t.add_argument("--config", help="a YAML file of TrainConfig fields")
    t.add_argument("--model")
    t.add_argument("--preset")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int)
    g.add_argument("--tokens", type=float)
    g.add_argument("--flops", type=float)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seq-len", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any TrainConfig field, dotted (optim.lr=1e-3)")
    t.add_argument("--out", default="runs/train", help="run directory (metrics.jsonl, checkpoint/)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --out")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train every cell of a matrix (default: the shipped 'default'), then report")
    r.add_argument("matrix", nargs="?", help="a shipped matrix name or a YAML path")
    r.add_argument("--out", help="results root (default results/runs)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a defaults field of the matrix")
    r.add_argument("--force", action="store_true", help="retrain cells that are already complete")
    r.add_argument("--list", action="store_true", help="list the cells and exit")
    r.set_defaults(func=cmd_run)

    rep = sub.add_parser("report", help="write report.md and plots from a results directory")
    rep.add_argument("results", nargs="?", help="results directory (default results/runs)")
    rep.add_argument("--out", help="where to write (default: the results directory)")
    rep.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (registry.UnknownModelError, ValueError, FileNotFoundError) as e:
        # ConfigError, DataError and CheckpointError are ValueErrors: one line naming the field or file
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
