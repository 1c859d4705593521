"""Validation: next-token loss over the validation split, overall and per source of the data mix.

The final evaluation of every run scores the *whole* split (every window; only the < seq_len tokens after the
last full window are left out, and the record says how many were scored). Intermediate evaluations may
subsample ``eval_batches`` batches, spread evenly over the split, so a learning curve is not the curve of one
document. Per source (Shakespeare / KJV, or each file of a user corpus) the loss is the mean over the targets
that fall in that source's documents, and bits per byte use that source's own bytes per token.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime import autocast
from .distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model, dataset, seq_len: int, batch_size: int, micro: int, max_batches: int, device, amp_dtype,
             info: DistInfo = DistInfo(), full: bool = False) -> dict[str, Any]:
    """Mean next-token loss on the validation split: all of it when ``full`` (or ``max_batches`` is 0), else
    ``max_batches`` global batches of ``batch_size`` windows spread over it; forwarded ``micro`` rows at a time.
    Under data parallelism each rank scores its block of every global batch and the sums are all-reduced, so
    the numbers are the same on any world size."""
    was_training = model.training
    model.eval()
    names, doc_source, doc_ends = dataset.val_sources()
    n_src = len(names)
    src_nats = torch.zeros(n_src, dtype=torch.float64)
    src_count = torch.zeros(n_src, dtype=torch.float64)
    batches = dataset.val_batches(seq_len, batch_size, None if full or not max_batches else max_batches,
                                  info.rank, info.world_size, spread=True)
    for starts_all, x_all, y_all in batches.with_starts():
        for i in range(0, max(x_all.shape[0], 1), micro):
            x, y, starts = x_all[i:i + micro], y_all[i:i + micro], starts_all[i:i + micro]
            empty = x.shape[0] == 0
            if empty:  # a short last batch may leave a rank no rows; a sharded model still needs its forward
                x, y = torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, seq_len, dtype=torch.long)
            with autocast(device, amp_dtype):
                logits = model(x.to(device))
            if empty:
                continue
            nats = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
            # target y[r, t] is split position starts[r] + 1 + t; its document, then its source
            pos = (starts[:, None] + 1 + np.arange(seq_len)[None, :]).reshape(-1)
            src = torch.from_numpy(doc_source[np.searchsorted(doc_ends, pos, side="right")])
            src_nats += torch.bincount(src, weights=nats.double().cpu(), minlength=n_src)
            src_count += torch.bincount(src, minlength=n_src).double()
    sums = all_reduce_sum(src_nats.tolist() + src_count.tolist(), info, device)
    src_nats, src_count = sums[:n_src], sums[n_src:]
    model.train(was_training)
    total, count = sum(src_nats), sum(src_count)
    loss = total / max(count, 1)
    bpt = dataset.source_bytes_per_token()
    per_source = {}
    for name, nats, n in zip(names, src_nats, src_count):
        if n:
            mean = nats / n
            per_source[name] = {"loss": mean, "bpb": mean / bpt[name] / math.log(2), "tokens": int(n)}
    return {"val_loss": loss, "val_tokens": int(count), "val_bpb": dataset.bits_per_byte(loss),
            "val_ppl": math.exp(min(loss, 50.0)), "val_full": batches.full,
            "val_windows": f"{batches.windows}/{batches.total_windows}", "val_sources": per_source}
