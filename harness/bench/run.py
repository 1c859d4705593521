"""The run: every row of a BenchSpec, each logged in one line and merged into bench.json as it finishes; the
peak FLOP/s re-measured at the end when it was a timed matmul; then the files (harness.bench_report); and the
`harness bench` command."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import store
from ..numbers import human
from ..runtime import device_name, environment
from .phases import bench_row
from .spec import BenchSpec, cell_impls, make_spec
from .timing import peak_flops


@dataclasses.dataclass
class BenchResult:
    rows: list[dict[str, Any]]            # this run's rows
    all_rows: list[dict[str, Any]]        # bench.json after merging with earlier runs in the same directory
    files: list[Path]
    ratios: list[dict[str, Any]]
    wall_s: float
    peak: dict[str, Any]


def _row_summary(row: dict[str, Any]) -> str:
    dec = " ".join(f"b{b} {human(e.get('tokens_per_s'))}" for b, e in (row.get("decode") or {}).items())
    mfu = row.get("mfu")
    impl = f" [{row['pattention_impl']}]" if row.get("pattention_impl") else ""
    return (f"{row['model']}/{row['preset']}{impl} seq {row['seq_len']} batch {row['batch_size']}: "
            f"train {human(row.get('train_tokens_per_s'))} tok/s, MFU {'-' if mfu is None else f'{100 * mfu:.2f}%'}, "
            f"prefill {human(row.get('prefill_tokens_per_s'))} tok/s, decode {dec} tok/s"
            + ("" if row["status"] == "ok" else f" [{row['status']}: {'; '.join(row['errors'].values())}]"))


def _remeasure_peak(spec: BenchSpec, peak: dict[str, Any], rows: list[dict[str, Any]], meta: dict[str, Any],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """A timed matmul on a shared machine can catch a slow moment: measure again, keep the best, and base
    every row of this run on it (MFU stays comparable across the rows). Updates ``rows`` and ``meta``."""
    best = peak_flops(spec.device, spec.dtype, fresh=True)
    if best["peak_flops"] > peak["peak_flops"]:
        log(f"peak FLOP/s re-measured after the rows: {best['peak_flops'] / 1e12:.4g} TFLOP/s (kept: the best)")
        peak = best
    for row in rows:
        row.update(peak)
        if row.get("train_flops_per_s") is not None:
            row["mfu"] = row["train_flops_per_s"] / peak["peak_flops"]
    meta.update(peak)
    return peak


def run_bench(spec: BenchSpec, log: Callable[[str], None] | None = print) -> BenchResult:
    """Every row of ``spec``; bench.json rewritten atomically after each row (rows of earlier runs in the same
    directory are kept unless this run re-measures them), then bench.csv, bench.md and the plot."""
    from .. import bench_report
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    out = Path(spec.out)
    previous = bench_report.read_rows(out)
    peak = peak_flops(spec.device, spec.dtype)
    log(f"peak FLOP/s for MFU: {peak['peak_flops'] / 1e12:.4g} TFLOP/s ({peak['peak_flops_source']})")
    meta = {"environment": environment(spec.device), "git_revision": store.git_revision(),
            "versions": store.library_versions(), **peak,
            "request": {k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                        for k, v in dataclasses.asdict(spec).items()}}
    rows: list[dict[str, Any]] = []
    plan = [(name, preset, seq_len, batch, impl) for name, preset in spec.cells
            for impl in cell_impls(spec, name, preset) for seq_len in spec.seq_lens for batch in spec.batch_sizes]
    for name, preset, seq_len, batch, impl in plan:
        r0 = time.perf_counter()
        row = bench_row(spec, name, preset, seq_len, batch, peak, impl)
        row["wall_s"] = time.perf_counter() - r0
        rows.append(row)
        log(f"[{len(rows)}/{len(plan)}] {_row_summary(row)} ({row['wall_s']:.1f} s)")
        merged = bench_report.merge_rows(previous, rows)
        bench_report.write_json(out, meta, merged)
    if peak.get("peak_flops_measured"):
        peak = _remeasure_peak(spec, peak, rows, meta, log)
    merged = bench_report.merge_rows(previous, rows)
    ratios = bench_report.matched_flops_ratios(merged)
    files = bench_report.write_outputs(out, meta, merged, ratios)
    return BenchResult(rows=rows, all_rows=merged, files=files, ratios=ratios,
                       wall_s=time.perf_counter() - t0, peak=peak)


def cli(args) -> int:
    """`harness bench` (called by harness.cli.cmd_bench with the parsed arguments)."""
    from .. import bench_report
    t0 = time.perf_counter()
    spec = make_spec(model=args.model, preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                     decode_batch=args.decode_batch, decode_tokens=args.decode_tokens, repeats=args.repeats,
                     warmup=args.warmup, device=args.device, dtype=args.dtype, compile=args.compile,
                     out=args.out, sweep=args.sweep, backend=args.backend,
                     pattention_impl=args.pattention_impl)
    cells = ", ".join(f"{m}/{p}" for m, p in spec.cells)
    print(f"bench on {device_name(spec.device)} ({spec.dtype}{', compiled' if spec.compile else ''}, "
          f"sdpa {spec.backend}): {cells}; seq {spec.seq_lens}, batch {spec.batch_sizes}, decode batch "
          f"{spec.decode_batches} x {spec.decode_tokens} tokens; {spec.warmup} warm-up + {spec.repeats} timed "
          f"repeats -> {spec.out}", flush=True)
    result = run_bench(spec, log=lambda s: print(s, flush=True))
    print()
    print(bench_report.markdown_table(result.rows))
    print()
    for line in bench_report.ratio_lines(bench_report.matched_flops_ratios(result.rows)):
        print(line)
    for line in bench_report.impl_ratio_lines(bench_report.impl_ratios(result.rows)):
        print(line)
    print(f"MFU peak: {result.peak['peak_flops_source']}")
    print(f"peak mem: {result.rows[0].get('memory_method') if result.rows else '-'}")
    for f in result.files:
        print(f"wrote {f}")
    print(f"{len(result.rows)} row(s) in {time.perf_counter() - t0:.1f} s")
    return 1 if any(r["status"] == "failed" for r in result.rows) else 0
