"""``lm_eval.simple_evaluate`` around a harness checkpoint, the Table-1 row, and lm-eval's own output files.

    out = evaluate_checkpoint("runs/cell/checkpoint", "paper", limit=200)
    out["table"]    # {"LAMBADA ppl": ..., "LAMBADA acc": ..., ..., "Average": ...}
    out["results"]  # lm-eval's results dict (JSON-safe)
    print(format_table(results_table(out["results"])))

Evaluation never disturbs the caller's random streams: lm-eval seeds Python, NumPy and torch (with its default
seeds 0 / 1234 / 1234, so an evaluation is reproducible), and every one of those states -- CUDA's too -- is
saved before and restored after, so a training loop that evaluates mid-run continues exactly as without.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .tasks import (HELDOUT_TASK, LOCAL_SUFFIX, EvalTaskError, hf_offline, hub_reachable, require_lm_eval,
                    resolve_tasks)

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP_ITERS = 1000
SEEDS = (0, 1234, 1234, 1234)  # lm-eval's defaults: python, numpy, torch, few-shot

# column, task, metric, scale (accuracies in percent, as Table 1 prints them)
TABLE_COLUMNS: list[tuple[str, str, str, float]] = [
    ("LAMBADA ppl", "lambada_openai", "perplexity", 1.0),
    ("LAMBADA acc", "lambada_openai", "acc", 100.0),
    ("HellaSwag", "hellaswag", "acc_norm", 100.0),
    ("PIQA", "piqa", "acc", 100.0),
    ("ARC-E", "arc_easy", "acc", 100.0),
    ("ARC-C", "arc_challenge", "acc_norm", 100.0),
    ("WinoGrande", "winogrande", "acc", 100.0),
]
AVERAGE = "Average"
ACCURACY_COLUMNS = [c for c, _, m, _ in TABLE_COLUMNS if m != "perplexity"]
EXTRA_COLUMNS: list[tuple[str, str, str, float]] = [
    ("WikiText ppl", "wikitext", "word_perplexity", 1.0),
    ("held-out bpb", HELDOUT_TASK, "bits_per_byte", 1.0),
]


# ------------------------------------------------------------------------------------------------ RNG
@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save the Python, NumPy and torch (CPU and every CUDA device) RNG states; restore them on exit."""
    import numpy as np
    import torch
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- table
def _task_results(results: dict[str, Any], task: str) -> dict[str, Any] | None:
    res = results.get("results", results)
    return res.get(task) or res.get(f"{task}{LOCAL_SUFFIX}")


def _metric(entry: dict[str, Any] | None, metric: str) -> float | None:
    if not entry:
        return None
    for key in (f"{metric},none", metric):
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    for key, v in entry.items():  # a filtered variant ("acc,<filter>")
        if key.split(",")[0] == metric and isinstance(v, (int, float)):
            return float(v)
    return None


def table_row(results: dict[str, Any], extras: bool = True) -> dict[str, float | None]:
    """simple_evaluate's results -> the Table-1 row: LAMBADA ppl, LAMBADA acc, HellaSwag (acc_norm), PIQA,
    ARC-E, ARC-C (acc_norm), WinoGrande, Average (of the six accuracies; None unless all six ran), then
    WikiText word perplexity and held-out bits per byte when they ran. Accuracies in percent; a task that
    did not run gives None."""
    row: dict[str, float | None] = {}
    for col, task, metric, scale in TABLE_COLUMNS:
        v = _metric(_task_results(results, task), metric)
        row[col] = None if v is None else v * scale
    accs = [row[c] for c in ACCURACY_COLUMNS]
    row[AVERAGE] = sum(accs) / len(accs) if all(a is not None for a in accs) else None
    if extras:
        for col, task, metric, scale in EXTRA_COLUMNS:
            v = _metric(_task_results(results, task), metric)
            if v is not None:
                row[col] = v * scale
    return row


def results_table(results: dict[str, Any], name: str | None = None, extras: bool = True):
    """The one-row pandas DataFrame of :func:`table_row` (a leading ``Model`` column when ``name``)."""
    import pandas as pd
    row = table_row(results, extras)
    if name is not None:
        row = {"Model": name, **row}
    return pd.DataFrame([row])


def format_table(df, floatfmt: str = ".2f") -> str:
    """Markdown (missing values as '-')."""
    return df.to_markdown(index=False, floatfmt=floatfmt, missingval="-")


def _json_safe(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)  # NaN / inf: strict JSON has no literal for them
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return clean(json.loads(json.dumps(obj, default=handle_non_serializable)))


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_lm(lm, tasks: Sequence[str] | str, *, state: dict[str, Any] | None = None, limit: int | float | None = None,
                offline: bool | None = None, bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
                output_path: str | os.PathLike | None = None, log_samples: bool = False,
                cache_dir: str | os.PathLike | None = None, install: bool = True,
                model_args: str | dict | None = None, seeds: Sequence[int | None] = SEEDS,
                include_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run ``tasks`` on an lm-eval LM (a :class:`~harness.evaluate.adapter.HarnessLM`). ``state``: the
    checkpoint state (for the ``heldout`` task). ``offline=None`` probes the hub. ``include_path``: extra
    task YAMLs (a directory) next to the generated ones. Returns ``{"table", "results", "offline",
    "seconds", "tasks", "skipped", "files"}``."""
    require_lm_eval()
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    t0 = time.perf_counter()
    offline = (not hub_reachable()) if offline is None else bool(offline)
    files: list[str] = []
    with tempfile.TemporaryDirectory(prefix="harness-eval-tasks-") as tmp, hf_offline(offline):
        plan = resolve_tasks(tasks, tmp, offline, state=state, cache_dir=cache_dir, install=install,
                             extra_include=[include_path] if include_path else ())
        for name, why in plan.skipped.items():
            log.info("skipping %s: %s", name, why)
        tm = plan.task_manager()
        tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
        with preserved_rng():
            results = lm_eval.simple_evaluate(
                model=lm, model_args=model_args or "", tasks=list(plan.names), task_manager=tm, limit=limit,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, evaluation_tracker=tracker,
                batch_size=getattr(lm, "batch_size", None), device=str(getattr(lm, "device", "")) or None,
                random_seed=seeds[0], numpy_random_seed=seeds[1], torch_random_seed=seeds[2],
                fewshot_random_seed=seeds[3])
        samples = results.pop("samples", None)
        results["harness"] = {"offline": offline, "tasks": list(plan.names), "skipped": dict(plan.skipped),
                              "local_of": dict(plan.local_of)}
        if tracker is not None:
            tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
            if log_samples and samples:
                for task_name in results["configs"]:
                    tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            out_dir = Path(output_path)
            if out_dir.suffix == ".json":
                out_dir = out_dir.parent
            else:
                out_dir = out_dir / str(tracker.general_config_tracker.model_name_sanitized)
            date_id = getattr(tracker, "date_id", None)
            files = sorted(str(p) for p in out_dir.glob(f"*{date_id}*") if p.is_file()) if date_id else []
            if not files:
                raise EvalTaskError(f"lm-eval wrote no results file under {output_path}")
    safe = _json_safe(results)
    return {"table": table_row(safe), "results": safe, "offline": offline,
            "seconds": time.perf_counter() - t0, "tasks": list(plan.names), "skipped": dict(plan.skipped),
            "files": files}


def evaluate_checkpoint(checkpoint_dir: str | os.PathLike, tasks: list[str] | str = "paper",
                        limit: int | float | None = None, offline: bool | None = None,
                        batch_size: int | str = 16, device: str = "cpu",
                        bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, output_path: str | os.PathLike | None = None,
                        log_samples: bool = False, *, cache_dir: str | os.PathLike | None = None,
                        install: bool = True, **model_kwargs: Any) -> dict[str, Any]:
    """Evaluate a training checkpoint (its directory, or the run directory holding ``checkpoint/``).

    ``tasks``: ``"paper"`` (the six + wikitext + heldout), ``"paper_core"``, lm-eval task names, or a list.
    ``offline=None`` auto-detects (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the hub not answering).
    ``output_path``: lm-eval's layout (``<output_path>/<model>/results_<date>.json``, ``samples_<task>_<date>.jsonl``
    with ``log_samples``). Returns ``{"table": {column: value}, "results": lm-eval results (JSON-safe),
    "offline": bool, "seconds": float, "tasks": [...], "skipped": {task: why}, "files": [...]}``.
    Does not change the caller's Python / NumPy / torch RNG states."""
    require_lm_eval()
    from .adapter import HarnessLM
    t0 = time.perf_counter()
    with preserved_rng():  # loading and building touch no RNG today; keep it that way for the caller
        lm = HarnessLM(checkpoint=checkpoint_dir, batch_size=batch_size, device=device, **model_kwargs)
    out = evaluate_lm(lm, tasks, state=lm.state, limit=limit, offline=offline, bootstrap_iters=bootstrap_iters,
                      output_path=output_path, log_samples=log_samples, cache_dir=cache_dir, install=install,
                      model_args={"pretrained": str(checkpoint_dir)})
    out["seconds"] = time.perf_counter() - t0
    return out
