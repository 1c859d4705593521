"""Small fixtures shared by the test modules: a tiny real-text corpus made on the spot, nothing downloaded."""
from pathlib import Path

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ")


def write_corpus(root: Path, docs: int = 12, repeats=lambda i: 3 + i % 4) -> Path:
    """``docs`` .txt documents of TEXT repeated ``repeats(i)`` times, each ending with its own chapter line."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (root / f"doc{i:02d}.txt").write_text(TEXT * repeats(i) + f" Chapter {i}.")
    return root


def tiny_train_config(corpus: Path, cache: Path, **overrides):
    """A validated TrainConfig for a few steps of the tiny tokenformer on ``corpus`` (byte-level); keyword
    arguments deep-merge over the defaults (a budget replaces the default one)."""
    from harness.config import TrainConfig, from_dict, merge
    base = {"model": "tokenformer", "preset": "tiny", "seq_len": 32, "batch_size": 4,
            "data": {"source": str(corpus), "tokenizer": "byte", "cache_dir": str(cache), "val_fraction": 0.2},
            "budget": {"steps": 8}, "eval_every": 4, "eval_batches": 2, "log_every": 1, "checkpoint_every": 3,
            "progress": False}
    return from_dict(TrainConfig, merge(base, overrides)).validate()


def trained_like(model, scale: float = 0.02, seed: int = 1):
    """Perturb a fresh model so that no weight sits at its init value (norm weights not 1, zero-initialised
    projections not 0): what a trained checkpoint looks like to growth, export and conversion tests."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()
