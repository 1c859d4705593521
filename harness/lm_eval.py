"""``python -m harness.lm_eval``: lm-eval's own command line with model type ``harness`` registered.

    python -m harness.lm_eval --model harness --model_args checkpoint=runs/x/checkpoint \\
        --tasks hellaswag_local,piqa_local --device cpu --batch_size 16 --output_path out/ --log_samples

Every lm-eval flag works unchanged (this hands over to ``lm_eval.__main__.cli_evaluate``). The only addition:
when no ``--include_path`` is given and ``harness eval --prepare-data`` has written the offline task YAMLs
(``<cache>/eval/tasks``: ``lambada_openai_local``, ``hellaswag_local``, ...), that directory is added as
``--include_path`` so the ``_local`` tasks resolve. model_args of ``harness``: ``checkpoint`` (alias
``pretrained``), ``batch_size``, ``max_batch_size``, ``device``, ``dtype``, ``max_length``, ``max_gen_toks``.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("harness: error: lm-eval is not installed: run `python -m pip install lm-eval==0.4.13`", file=sys.stderr)
        raise SystemExit(2)
    from harness.evaluate import adapter  # noqa: F401  (registers --model harness)
    from harness.evaluate.tasks import eval_cache_dir

    args = list(sys.argv[1:] if argv is None else argv)
    tasks_dir = eval_cache_dir() / "tasks"
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in args) and tasks_dir.is_dir() \
            and any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in args):
        args += ["--include_path", str(tasks_dir)]
    sys.argv = [sys.argv[0] if sys.argv else "harness.lm_eval"] + args
    cli_evaluate()


if __name__ == "__main__":
    main()
