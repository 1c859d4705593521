"""Files of `harness bench`: bench.json (every row, atomically), bench.csv, bench.md (a pandas Markdown table,
the matched-FLOPs Tokenformer / Transformer++ ratio and the method notes) and a seaborn plot of training
throughput against sequence length."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from . import store
from .results.tables import human

JSON_NAME = "bench.json"
CSV_NAME = "bench.csv"
MD_NAME = "bench.md"
PLOT_NAME = "throughput_vs_seq_len.png"

TOKENFORMER, TRANSFORMER_PP = "tokenformer", "transformer_pp"
# the columns that identify a measurement (and pair rows for the ratio, without model and preset)
_KEY = ("model", "preset", "seq_len", "batch_size", "device", "device_name", "dtype", "compile", "backend",
        "pattention_impl")
_PAIR = ("seq_len", "batch_size", "device", "device_name", "dtype", "compile", "backend")


# ---------------------------------------------------------------------------------------------- the store
def read_rows(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / JSON_NAME
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("rows", []))
    except (ValueError, AttributeError):
        return []


def merge_rows(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier rows, minus those this run measured again, then this run's rows."""
    keys = {tuple(r.get(k) for k in _KEY) for r in new}
    return [r for r in previous if tuple(r.get(k) for k in _KEY) not in keys] + list(new)


def write_json(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    path = Path(out) / JSON_NAME
    store.write_json_atomic(path, {"meta": meta, "rows": rows})
    return path


# ------------------------------------------------------------------------------------------------ ratios
def _ok_train(row: dict[str, Any]) -> bool:
    return row.get("train_tokens_per_s") is not None


def matched_flops_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tokenformer / Transformer++ training throughput at the same seq_len, batch, device, dtype, compile and
    backend: in tokens/s, and in FLOP/s (= the inverse ratio of time per training FLOP, i.e. at matched FLOPs).

    Pairs: the same preset name (tiny/tiny), Tokenformer X with Transformer++ tfX (its parameter-matched
    twin), else -- when a group holds exactly one preset of each -- those two (e.g. 450m vs 350m)."""
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("model") in (TOKENFORMER, TRANSFORMER_PP) and _ok_train(r):
            groups.setdefault(tuple(r.get(k) for k in _PAIR), {TOKENFORMER: [], TRANSFORMER_PP: []})[r["model"]].append(r)
    out = []
    for key, g in groups.items():
        tfs, tpps = g[TOKENFORMER], g[TRANSFORMER_PP]
        pairs = []
        for tf in tfs:
            match = [t for t in tpps if t["preset"] in (tf["preset"], f"tf{tf['preset']}")]
            pairs += [(tf, t) for t in match]
        if not pairs and len(tfs) == 1 and len(tpps) == 1:
            pairs = [(tfs[0], tpps[0])]
        for tf, tpp in pairs:
            tok = tf["train_tokens_per_s"] / tpp["train_tokens_per_s"]
            flops = (tf["train_tokens_per_s"] * tf["flops_per_token"]) / (tpp["train_tokens_per_s"] * tpp["flops_per_token"])
            out.append({"tokenformer_preset": tf["preset"], "transformer_pp_preset": tpp["preset"],
                        "pattention_impl": tf.get("pattention_impl"),
                        **dict(zip(_PAIR, key)), "tokens_per_s_ratio": tok, "flops_per_s_ratio": flops,
                        "time_per_flop_ratio": 1.0 / flops,
                        "tokenformer_flops_per_token": tf["flops_per_token"],
                        "transformer_pp_flops_per_token": tpp["flops_per_token"]})
    return out


def ratio_lines(ratios: list[dict[str, Any]]) -> list[str]:
    if not ratios:
        return ["Matched-FLOPs ratio: needs tokenformer and transformer_pp rows with the same seq_len, batch, "
                "device and dtype."]
    lines = ["Matched-FLOPs ratio, Tokenformer ÷ Transformer++ training throughput (FLOP/s ratio = how much "
             "more training compute per second; its inverse is the ratio of time per training FLOP):"]
    for r in ratios:
        impl = f" ({r['pattention_impl']})" if r.get("pattention_impl") else ""
        lines.append(
            f"- tokenformer/{r['tokenformer_preset']}{impl} ÷ transformer_pp/{r['transformer_pp_preset']} at seq "
            f"{r['seq_len']}, batch {r['batch_size']}, {r['device']} {r['dtype']}"
            f"{', compiled' if r['compile'] else ''}: tokens/s {r['tokens_per_s_ratio']:.3f}×, "
            f"FLOP/s {r['flops_per_s_ratio']:.3f}× (time per training FLOP {r['time_per_flop_ratio']:.3f}×; "
            f"FLOPs/token {human(r['tokenformer_flops_per_token'])} vs {human(r['transformer_pp_flops_per_token'])})")
    return lines


_IMPL_PAIR = tuple(k for k in _KEY if k != "pattention_impl")


def impl_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each Pattention implementation against the reference on the same model, preset, shape, device, dtype,
    compile and backend: step time, peak training memory, and the bytes saved for backward (all of them, and
    those saved inside Pattentions) -- each as this implementation ÷ the reference's."""
    refs = {tuple(r.get(k) for k in _IMPL_PAIR): r for r in rows
            if r.get("pattention_impl") == "reference" and _ok_train(r)}
    out = []
    for r in rows:
        ref = refs.get(tuple(r.get(k) for k in _IMPL_PAIR))
        if ref is None or r is ref or not _ok_train(r) or not r.get("pattention_impl"):
            continue

        def ratio(key):
            a, b = r.get(key), ref.get(key)
            return a / b if a is not None and b else None
        out.append({**{k: r.get(k) for k in _IMPL_PAIR}, "pattention_impl": r["pattention_impl"],
                    "pattention_impl_ran": r.get("pattention_impl_ran"),
                    "step_time_ratio": ratio("train_time_s_median"),
                    "peak_memory_ratio": ratio("peak_memory_bytes"),
                    "saved_activation_ratio": ratio("saved_activation_bytes"),
                    "pattention_saved_ratio": ratio("pattention_saved_bytes")})
    return out


def impl_ratio_lines(ratios: list[dict[str, Any]]) -> list[str]:
    if not ratios:
        return []

    def x(v):
        return "-" if v is None else f"{v:.3f}×"
    lines = ["Pattention implementations ÷ the reference (same model, preset, shape, device, dtype, compile): "
             "training step time (median), peak training memory, bytes saved for backward (all; inside "
             "Pattentions):"]
    for r in ratios:
        ran = f", ran {r['pattention_impl_ran']}" if r.get("pattention_impl_ran") not in (None, r["pattention_impl"]) else ""
        lines.append(
            f"- {r['model']}/{r['preset']} {r['pattention_impl']}{ran} at seq {r['seq_len']}, batch {r['batch_size']}, "
            f"{r['device']} {r['dtype']}{', compiled' if r['compile'] else ''}: step time {x(r['step_time_ratio'])}, "
            f"peak memory {x(r['peak_memory_ratio'])}, saved for backward {x(r['saved_activation_ratio'])} "
            f"(Pattention {x(r['pattention_saved_ratio'])})")
    return lines


# ------------------------------------------------------------------------------------------------- table
def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n:.0f} B"


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _median_spread(row: dict[str, Any], prefix: str) -> str:
    med = row.get(f"{prefix}_tokens_per_s")
    if med is None:
        return "-"
    lo, hi = row.get(f"{prefix}_tokens_per_s_min"), row.get(f"{prefix}_tokens_per_s_max")
    return f"{_rate(med)} ({_rate(lo)}–{_rate(hi)})"


def _backends(row: dict[str, Any]) -> str:
    parts = []
    ab = row.get("attention_backends") or {}
    vals = [v for v in (ab.get("train"), ab.get("prefill"), ab.get("decode")) if v]
    if vals:
        parts.append(vals[0] if len(set(vals)) == 1 else
                     f"train {ab.get('train')} / prefill {ab.get('prefill')} / decode {ab.get('decode')}")
    scans = [v for v in (row.get("scan_backend"), row.get("decode_scan_backend")) if v]
    if scans:
        parts.append(f"scan {scans[0]}" if len(set(scans)) == 1 else f"scan train {scans[0]} / decode {scans[-1]}")
    elif row.get("scan_backend_expected"):
        parts.append(f"scan {row['scan_backend_expected']}")
    return "; ".join(parts) or "-"


def _saved(row: dict[str, Any]) -> str:
    if row.get("saved_activation_bytes") is None:
        return "-"
    inner = row.get("pattention_saved_bytes")
    return _bytes(row["saved_activation_bytes"]) + (f" ({_bytes(inner)})" if inner else "")


def _decode(row: dict[str, Any]) -> str:
    parts = []
    for b, e in (row.get("decode") or {}).items():
        parts.append(f"b{b}: {_rate(e.get('tokens_per_s')) if e.get('status') == 'ok' else e.get('status')}")
    return " · ".join(parts) or "-"


def table_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    recs = []
    for r in rows:
        mfu = r.get("mfu")
        recs.append({
            "model": r["model"], "preset": r["preset"], "pattention": r.get("pattention_impl") or "-",
            "seq": r["seq_len"], "batch": r["batch_size"],
            "device": r["device"], "dtype": r["dtype"] + (" compiled" if r.get("compile") else ""),
            "train tok/s (median, min–max)": _median_spread(r, "train"),
            "MFU": "-" if mfu is None else f"{100 * mfu:.2f}%",
            "peak mem": _bytes(r.get("peak_memory_bytes")),
            "saved for backward (Pattention)": _saved(r),
            "prefill tok/s": _median_spread(r, "prefill"),
            "decode tok/s": _decode(r),
            "cache/seq": _bytes(r.get("cache_bytes_per_seq")),
            "backends": _backends(r),
            "status": r.get("status", "-"),
        })
    return pd.DataFrame(recs)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    return table_frame(rows).to_markdown(index=False)


def notes(rows: list[dict[str, Any]]) -> list[str]:
    peaks = sorted({r.get("peak_flops_source") for r in rows if r.get("peak_flops_source")})
    mem = sorted({r.get("memory_method") for r in rows if r.get("memory_method")})
    devs = sorted({f"{r.get('device')}: {r.get('device_name')}" for r in rows})
    return [
        f"Devices: {'; '.join(devs)}.",
        "Train tok/s: a full step (forward, cross-entropy, backward, AdamW step, zero_grad) on batch × seq random "
        "tokens; bf16 autocast with fp32 master weights when dtype is bf16. Median over the timed repeats, "
        "(min–max) in brackets; the warm-up steps are excluded; CUDA events on GPU, a host timer on CPU.",
        "MFU = flops_per_token(seq) × train tokens/s ÷ peak FLOP/s, with the registry's training FLOPs "
        "(3 × forward, attention over the full S×S matrix); peak: " + "; ".join(peaks) + ".",
        "Peak mem (training): " + "; ".join(mem) + ".",
        "Saved for backward: bytes of the distinct storages autograd keeps after one eager forward + loss "
        "(saved-tensor hooks; parameters excluded), in brackets those saved inside Pattention modules; '-' for "
        "compiled rows, whose graph chooses its own saved set. Pattention: the implementation the row asked "
        "for (models/pattention.py).",
        "Prefill tok/s: batch × seq prompt tokens through `model.step` into a fresh cache. Decode tok/s: "
        "decode batch × new tokens / time of greedy one-token `model.step` calls after an untimed prefill, the "
        "context ending at seq (b1, b8: the decode batch). Inference weights and cache in the row's dtype.",
        "Cache/seq: decoding-cache bytes for one sequence at seq (KV cache: grows with seq; Mamba: conv + SSM "
        "state, constant). Backends: the SDPA backend selected for the training / prefill / decode shapes "
        "(sdpa-cpu(flash_attention_for_cpu) or math on CPU), the selective-scan backend that ran (Mamba).",
    ]


def write_outputs(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                  ratios: list[dict[str, Any]]) -> list[Path]:
    """bench.json, bench.csv, bench.md and the plot; returns their paths."""
    out = Path(out)
    files = [write_json(out, meta, rows)]
    flat = pd.json_normalize(rows, sep=".")
    for col in flat.columns:  # lists (times, iqr) as JSON text
        if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    csv_path = out / CSV_NAME
    store.write_text_atomic(csv_path, flat.to_csv(index=False))
    files.append(csv_path)
    order = {m: i for i, m in enumerate(("tokenformer", "transformer_pp", "mamba", "mamba2", "gpt2"))}
    ordered = sorted(rows, key=lambda r: (r.get("device", ""), r.get("dtype", ""), order.get(r["model"], 99),
                                          r["model"], r["preset"], r["seq_len"], r["batch_size"],
                                          bool(r.get("compile")), r.get("pattention_impl") or ""))
    lines = ["# Throughput, MFU and memory (`harness bench`)", "", markdown_table(ordered), ""]
    lines += ratio_lines(ratios) + [""]
    impl_lines = impl_ratio_lines(impl_ratios(ordered))
    lines += impl_lines + ([""] if impl_lines else [])
    plot = out / PLOT_NAME
    if write_plot(rows, plot):
        files.append(plot)
        lines += [f"![training tokens/s against sequence length]({PLOT_NAME})", ""]
    lines += [f"- {n}" for n in notes(rows)] + [""]
    md_path = out / MD_NAME
    store.write_text_atomic(md_path, "\n".join(lines))
    files.append(md_path)
    return files


def write_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Training tokens/s against seq_len (log2 axis), one line per model; style per preset / batch."""
    data = [{"model": r["model"], "variant": f"{r['preset']} b{r['batch_size']} {r['dtype']}",
             "seq_len": r["seq_len"], "train tokens/s": r["train_tokens_per_s"]} for r in rows if _ok_train(r)]
    if not data:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = pd.DataFrame(data)
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    style = "variant" if df["variant"].nunique() > 1 else None
    marks = {"style": style, "markers": True, "dashes": True} if style else {"marker": "o"}
    sns.lineplot(data=df, x="seq_len", y="train tokens/s", hue="model", errorbar=None, ax=ax, **marks)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(df["seq_len"].unique())
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("training tokens/s (median)")
    ax.set_title("Training throughput against sequence length")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True
