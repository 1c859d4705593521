"""`harness bench`: rows, files, the cache API, OOM handling and bad requests -- tiny shapes, CPU, seconds."""
import json

import pandas as pd
import pytest
import torch

from harness import bench, bench_report
from harness.cli import main
from models import registry
from models.ops import dispatch
from models.mamba import MambaLM, SSMCache
from models.transformer import Transformer

ROW_FIELDS = ("model", "preset", "seq_len", "batch_size", "device", "device_name", "dtype", "compile", "backend",
              "status", "params", "flops_per_token", "train_tokens_per_s", "train_tokens_per_s_min",
              "train_tokens_per_s_max", "train_tokens_per_s_iqr", "train_times_s", "train_flops_per_s", "mfu",
              "peak_flops", "peak_flops_source", "peak_memory_bytes", "memory_method", "prefill_tokens_per_s",
              "prefill_tokens_per_s_min", "prefill_tokens_per_s_max", "decode", "cache_bytes_per_seq",
              "cache_kind", "attention_backend", "attention_backends", "scan_backend_expected")


@pytest.fixture
def fast_peak(monkeypatch):
    """Skip the 2048^2 matmul where a test does not need it."""
    monkeypatch.setattr(bench.timing, "measure_matmul_flops", lambda device, dtype, n, repeats=5: 1e10)
    monkeypatch.setattr(bench.timing, "_PEAK_CACHE", {})


def _spec(tmp_path, **kw):
    args = dict(model="transformer_pp", preset="tiny", seq_len=32, batch_size=2, decode_batch="1,2",
                decode_tokens=4, repeats=1, warmup=0, device="cpu", out=tmp_path)
    args.update(kw)
    return bench.make_spec(**args)


def test_cli_tiny_run_rows_and_files(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", "transformer_pp", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2",
                 "--decode-batch", "1,2", "--decode-tokens", "4", "--repeats", "1", "--warmup", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured: float32 matmul 2048x2048" in printed and "| transformer_pp" in printed

    data = json.loads((out / "bench.json").read_text())
    (row,) = data["rows"]
    for field in ROW_FIELDS:
        assert field in row, field
    assert row["status"] == "ok" and row["errors"] == {}
    assert (row["model"], row["preset"], row["seq_len"], row["batch_size"], row["dtype"]) == ("transformer_pp", "tiny", 32, 2, "fp32")
    assert row["train_tokens_per_s"] > 0 and len(row["train_times_s"]) == 1
    assert row["train_tokens_per_s_min"] <= row["train_tokens_per_s"] <= row["train_tokens_per_s_max"]
    assert row["mfu"] == pytest.approx(row["flops_per_token"] * row["train_tokens_per_s"] / row["peak_flops"])
    assert row["peak_memory_bytes"] > 0 and "RSS" in row["memory_method"]
    assert set(row["decode"]) == {"1", "2"}
    for b, entry in row["decode"].items():
        assert entry["status"] == "ok" and entry["tokens_per_s"] > 0 and entry["batch"] == int(b)
        assert entry["new_tokens"] == 4 and entry["prompt_len"] == 28
    # 2 layers x (k, v) x 4 heads x 32 positions x 16 dims x fp32
    assert row["cache_kind"] == "KVCache" and row["cache_bytes_per_seq"] == 2 * 2 * 4 * 32 * 16 * 4
    assert row["attention_backend"] in ("sdpa-cpu(flash_attention_for_cpu)", "math")
    assert row["scan_backend_expected"] is None

    for name in ("bench.json", "bench.csv", "bench.md", "throughput_vs_seq_len.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporaries
    csv = pd.read_csv(out / "bench.csv")
    assert len(csv) == 1 and "decode.1.tokens_per_s" in csv.columns
    md = (out / "bench.md").read_text()
    for header in ("train tok/s", "MFU", "peak mem", "prefill tok/s", "decode tok/s", "cache/seq", "backends"):
        assert header in md, header
    assert "MFU = flops_per_token" in md and "throughput_vs_seq_len.png" in md


def test_decode_goes_through_the_cache_api(tmp_path, fast_peak, monkeypatch):
    calls = []

    def spy(cls):
        original = cls.step

        def step(self, input_ids, cache):
            calls.append((cls.__name__, tuple(input_ids.shape), type(cache).__name__, cache.pos))
            return original(self, input_ids, cache)
        monkeypatch.setattr(cls, "step", step)

    spy(Transformer)
    spy(MambaLM)
    spec = _spec(tmp_path, model="tokenformer,mamba", seq_len=16, decode_batch="3", decode_tokens=5)
    result = bench.run_bench(spec, log=None)
    tf, mamba = result.rows
    assert tf["status"] == mamba["status"] == "ok"
    for cls, cache in (("Transformer", "KVCache"), ("MambaLM", "SSMCache")):
        ones = [c for c in calls if c[0] == cls and c[1] == (3, 1)]
        assert ones and all(c[2] == cache for c in ones)
        # the decode steps continue a prefill of 16 - 5 tokens up to position 15
        assert sorted({c[3] for c in ones}) == list(range(11, 16))
        assert any(c[1] == (3, 11) and c[3] == 0 for c in calls if c[0] == cls)  # the (untimed) prefill
        assert any(c[1] == (2, 16) and c[3] == 0 for c in calls if c[0] == cls)  # the timed prefill phase
    assert tf["decode"]["3"]["tokens_per_s"] > 0 and mamba["decode"]["3"]["tokens_per_s"] > 0
    assert tf["attention_backend"] in ("sdpa-cpu(flash_attention_for_cpu)", "math")
    assert mamba["attention_backend"] is None
    assert mamba["scan_backend"] == mamba["decode_scan_backend"] == dispatch.REFERENCE
    # Mamba's cache: constant conv + fp32 SSM state; computed from its tensors
    model = MambaLM(registry.get_config("mamba", "tiny"))
    cache = model.allocate_cache(1, 16)
    assert isinstance(cache, SSMCache)
    expected = sum(t.numel() * t.element_size() for t in cache.conv_states + cache.ssm_states)
    assert mamba["cache_bytes_per_seq"] == expected == cache.nbytes()
    assert mamba["cache_kind"] == "SSMCache"
    assert "scan torch_reference" in (tmp_path / "bench.md").read_text()


def test_oom_is_recorded_and_the_sweep_continues(tmp_path, fast_peak, monkeypatch):
    original = bench.train_step

    def train_step(model, optimizer, loss_fn, inputs, targets, amp_dtype):
        if inputs.shape[1] == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(model, optimizer, loss_fn, inputs, targets, amp_dtype)

    def decode_step(model, tokens, cache):
        if tokens.shape[0] == 2 and cache.max_len == 24:
            raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried... out of memory")
        return original_decode(model, tokens, cache)

    original_decode = bench.decode_step
    monkeypatch.setattr(bench.phases, "train_step", train_step)  # patched where bench_row's phases look it up
    monkeypatch.setattr(bench.phases, "decode_step", decode_step)
    result = bench.run_bench(_spec(tmp_path, seq_len="8,16,24"), log=None)
    by_seq = {r["seq_len"]: r for r in result.rows}
    assert [r["seq_len"] for r in result.rows] == [8, 16, 24]
    assert by_seq[8]["status"] == "ok" and by_seq[8]["train_tokens_per_s"] > 0
    oom = by_seq[16]
    assert oom["status"] == "OOM" and oom["errors"]["train"].startswith("OOM: OutOfMemoryError")
    assert oom.get("train_tokens_per_s") is None and oom.get("mfu") is None
    assert oom["prefill_tokens_per_s"] > 0 and oom["decode"]["1"]["status"] == "ok"  # other phases still ran
    assert by_seq[24]["status"] == "OOM" and by_seq[24]["decode"]["2"]["status"] == "OOM"
    assert by_seq[24]["decode"]["1"]["status"] == "ok" and by_seq[24]["train_tokens_per_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| OOM") == 2
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "OOM", "OOM"]


@pytest.mark.parametrize("argv, needle", [
    (["--backend", "fastest"], "unknown attention backend 'fastest'; valid: auto, flash, cudnn, efficient, math"),
    (["--backend", "cudnn", "--device", "cpu"], "needs CUDA"),
    (["--model", "tokenformer,nope"], "unknown model 'nope'"),
    (["--model", "gpt2", "--preset", "7b"], "unknown preset '7b'"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--seq-len", "32,abc"], "--seq-len: expected integers"),
    (["--pattention-impl", "reference,fast"], "--pattention-impl: unknown implementation 'fast'"),
    (["--pattention-impl", "triton", "--device", "cpu"], "--pattention-impl triton needs CUDA"),
])
def test_bad_requests_one_line_exit_2(argv, needle, tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path / "b"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("harness: error: ") and needle in err[0]
    assert not (tmp_path / "b").exists()


def test_preset_too_large_for_the_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench.spec, "device_memory_bytes", lambda device: (8 * 2**30, "available RAM"))
    built = []
    monkeypatch.setattr(registry, "build_from_config", lambda *a, **k: built.append(a))
    assert main(["bench", "--model", "tokenformer", "--preset", "tiny,1.5b", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'1.5b' of tokenformer is too large for cpu" in err[0]
    assert "GiB" in err[0] and "16 B/param" in err[0] and "8.0 GiB (available RAM)" in err[0]
    assert not built and not (tmp_path / "b").exists()
    with pytest.raises(bench.BenchError):
        bench.make_spec(model="gpt2:1.5b", device="cpu")


def test_spec_defaults_and_model_preset_pins(tmp_path):
    spec = bench.make_spec(device="cpu", preset="tiny,small", out=tmp_path)
    assert [m for m, _ in spec.cells][::2] == ["tokenformer", "transformer_pp", "mamba", "gpt2"]
    assert (spec.seq_lens, spec.batch_sizes, spec.decode_batches, spec.repeats, spec.warmup, spec.dtype) == \
        ([256], [8], [1, 8], 5, 2, "fp32")
    assert bench.make_spec(device="cpu", sweep=True).seq_lens == [128, 256, 512, 1024, 2048]
    pinned = bench.make_spec(model="transformer_pp:125m,tokenformer:150m,mamba", preset="tiny", device="cpu")
    assert pinned.cells == [("transformer_pp", "125m"), ("tokenformer", "150m"), ("mamba", "tiny")]


def test_matched_flops_ratio():
    def row(model, preset, tok_s, fpt, seq=256):
        return dict(model=model, preset=preset, seq_len=seq, batch_size=8, device="cpu", device_name="cpu",
                    dtype="fp32", compile=False, backend="auto", train_tokens_per_s=tok_s, flops_per_token=fpt)
    rows = [row("tokenformer", "small", 500.0, 9e6), row("transformer_pp", "small", 1000.0, 6e6),
            row("tokenformer", "450m", 100.0, 3e9, seq=2048), row("transformer_pp", "350m", 150.0, 2e9, seq=2048),
            row("gpt2", "small", 10.0, 1e6), row("transformer_pp", "tiny", 5000.0, 1e6)]
    ratios = {(r["tokenformer_preset"], r["transformer_pp_preset"]): r for r in bench_report.matched_flops_ratios(rows)}
    assert set(ratios) == {("small", "small"), ("450m", "350m")}
    small = ratios[("small", "small")]
    assert small["tokens_per_s_ratio"] == pytest.approx(0.5)
    assert small["flops_per_s_ratio"] == pytest.approx(0.75) and small["time_per_flop_ratio"] == pytest.approx(4 / 3)
    assert ratios[("450m", "350m")]["flops_per_s_ratio"] == pytest.approx(1.0)
    text = "\n".join(bench_report.ratio_lines(list(ratios.values())))
    assert "tokenformer/small ÷ transformer_pp/small at seq 256" in text and "tokens/s 0.500×" in text


def test_results_merge_across_runs(tmp_path, fast_peak):
    bench.run_bench(_spec(tmp_path, model="gpt2", seq_len=16, decode_batch="1"), log=None)
    result = bench.run_bench(_spec(tmp_path, model="transformer_pp", seq_len="16", decode_batch="1"), log=None)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt2", "transformer_pp"] == [r["model"] for r in result.all_rows]
    assert len(result.rows) == 1


def test_saved_for_backward_counts_what_each_pattention_path_keeps():
    """Hand-counted: the recompute Function saves x (T x d_in) and one fp32 norm per row (T), nothing else; the
    reference's autograd keeps at least the scores, GELU's input and the weights (three T x n tensors)."""
    from models.pattention import Pattention
    T, d_in, d_out, n = 24, 8, 8, 40

    class One(torch.nn.Module):  # x is a leaf-derived activation, as a block's normed input is
        def __init__(self, impl):
            super().__init__()
            self.p = Pattention(d_in, d_out, n, impl=impl)
            torch.nn.init.normal_(self.p.key_param_tokens)
            torch.nn.init.normal_(self.p.value_param_tokens)

        def forward(self, x):
            return self.p(x * 1.0)
    x = torch.randn(T, d_in, requires_grad=True)
    got = {}
    for impl in ("recompute", "reference"):
        m = One(impl)
        got[impl] = bench.saved_activation_bytes(m, lambda a, _b: m(a).square().sum(), x, None, None)
    assert got["recompute"]["pattention_saved_bytes"] == (T * d_in + T) * 4
    assert got["reference"]["pattention_saved_bytes"] >= 3 * T * n * 4
    # the loss's own square saves the (T, d_out) output, outside the Pattention
    for g in got.values():
        assert g["saved_activation_bytes"] - g["pattention_saved_bytes"] == T * d_out * 4


def test_pattention_impl_rows_have_their_own_key_and_ratios(tmp_path, fast_peak):
    result = bench.run_bench(_spec(tmp_path, model="tokenformer,transformer_pp", seq_len=32, decode_batch="1",
                                   pattention_impl="reference,recompute"), log=None)
    keys = [(r["model"], r["pattention_impl"], r.get("pattention_impl_ran")) for r in result.rows]
    # transformer_pp's config has the field but builds no Pattention: one row, no implementation
    assert keys == [("tokenformer", "reference", "reference"), ("tokenformer", "recompute", "recompute"),
                    ("transformer_pp", None, None)]
    assert all(r["status"] == "ok" for r in result.rows)
    ref, rec = result.rows[:2]
    assert rec["pattention_saved_bytes"] < ref["pattention_saved_bytes"]
    assert ref["saved_activation_bytes"] - ref["pattention_saved_bytes"] == \
        rec["saved_activation_bytes"] - rec["pattention_saved_bytes"]  # the rest of the model is the same
    (ratio,) = [r for r in bench_report.impl_ratios(result.rows) if r["model"] == "tokenformer"]
    assert ratio["pattention_impl"] == "recompute"
    assert ratio["pattention_saved_ratio"] == pytest.approx(rec["pattention_saved_bytes"] / ref["pattention_saved_bytes"])
    assert ratio["step_time_ratio"] == pytest.approx(rec["train_time_s_median"] / ref["train_time_s_median"])
    md = (tmp_path / "bench.md").read_text()
    assert "tokenformer/tiny recompute at seq 32" in md and "saved for backward (Pattention)" in md
    # a second run of one implementation replaces only its own row
    bench.run_bench(_spec(tmp_path, model="tokenformer", seq_len=32, decode_batch="1", pattention_impl="recompute"),
                    log=None)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert sorted((r["model"], r["pattention_impl"]) for r in rows if r["model"] == "tokenformer") == \
        [("tokenformer", "recompute"), ("tokenformer", "reference")]
