"""lm-eval adapter: any registry model as an ``lm_eval`` ``TemplateLM``, registered as model type ``harness``.

    lm = HarnessLM(checkpoint="runs/x/checkpoint")               # a training checkpoint (or its run dir)
    lm = HarnessLM(model=model, tokenizer=get_tokenizer("byte"))  # an in-memory model
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    python -m harness.lm_eval --model harness --model_args checkpoint=PATH --tasks piqa --device cpu

Scoring follows lm-eval's HF backend (``HFLM``) step for step, so numbers are comparable with published
lm-eval results:

- ``loglikelihood``: requests sorted longest-first by lm-eval's ``Collator`` (one-token continuations that share
  a context are scored once), right-padded into batches of ``batch_size``; context + continuation is
  left-truncated to the model's context ``max_length`` (+1, the last token is only a target). Log-softmax is
  taken over the model's whole (padded) vocabulary in float32 -- exactly the distribution training optimised.
- ``loglikelihood_rolling``: disjoint windows of ``max_length`` tokens from ``get_rolling_token_windows`` +
  ``make_disjoint_window`` (context_len 1), the first window prefixed with end-of-text; the sum over windows.
- ``generate_until``: greedy decoding through the registry's cache API (``allocate_cache`` + ``step``: one
  prefill of the whole prompt, then one token per step), stopping at end-of-text, at any ``until`` string or after
  ``max_gen_toks``; prompts left-truncated to ``max_length - max_gen_toks``. Requests with the same generation
  settings and the same prompt length are decoded together (the cache API has no padding mask, so only
  equal-length prompts share a batch). Sampling is not implemented: ``do_sample=True`` decodes greedily with a
  warning.

``batch_size`` comes as lm-eval passes it (an int, a digit string, ``"auto"`` / ``"auto:N"``); the ``auto``
forms mean :data:`DEFAULT_BATCH_SIZE` (no probing for the largest batch that fits).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval import utils as lm_utils
except ImportError as e:  # pragma: no cover - exercised only without the optional extra
    raise ImportError("the lm-eval adapter needs lm-eval: run `python -m pip install lm-eval==0.4.13` "
                      "(or `pip install -e '.[eval]'`)") from e
from tqdm import tqdm

from .. import runtime

log = logging.getLogger(__name__)

MODEL_TYPE = "harness"
DEFAULT_BATCH_SIZE = 16      # what "auto" means: no OOM probing on CPU
DEFAULT_MAX_GEN_TOKS = 256   # lm-eval's own default


class AdapterError(ValueError):
    """Bad adapter arguments (model_args, batch size, device); one line."""


def parse_batch_size(batch_size: Any, max_batch_size: Any = None) -> int:
    """lm-eval's batch_size (int, "8", "auto", "auto:4", None) -> a fixed positive int."""
    if batch_size is None:
        bs = DEFAULT_BATCH_SIZE
    elif isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
        bs = DEFAULT_BATCH_SIZE
    else:
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            raise AdapterError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}") from None
        if bs < 1:
            raise AdapterError(f"batch_size must be >= 1, got {bs}")
    if max_batch_size not in (None, ""):
        bs = min(bs, int(max_batch_size))
    return max(1, bs)


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise AdapterError(f"expected a boolean, got {v!r}")
    return bool(v)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": None, None: None}


class HarnessLM(TemplateLM):
    """A harness model (``models.registry``) behind lm-eval's LM interface.

    Give ``checkpoint`` (alias ``pretrained``): a training checkpoint directory or a run directory holding
    ``checkpoint/`` (architecture, config and tokenizer come from its ``state.json``); or ``model`` +
    ``tokenizer`` (anything with ``encode/decode/eot_id/vocab_size``, e.g. ``harness.data.get_tokenizer()``).
    ``max_length`` defaults to ``model.config.max_seq_len``. The model is put in eval mode.
    """

    backend = "causal"

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, pretrained: str | None = None,
                 model: torch.nn.Module | None = None, tokenizer: Any = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | torch.device | None = None, dtype: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 use_cache: bool = True, logits_cache: bool = True, **unused: Any) -> None:
        super().__init__()
        unused.pop("trust_remote_code", None)
        if unused:
            raise AdapterError(f"unknown model_args for --model {MODEL_TYPE}: {', '.join(sorted(unused))} "
                               "(valid: checkpoint, batch_size, max_batch_size, device, dtype, max_length, "
                               "max_gen_toks, use_cache, logits_cache)")
        checkpoint = checkpoint if checkpoint is not None else pretrained
        self._device = runtime.resolve_device(device, error=AdapterError)
        self.state: dict[str, Any] | None = None
        if checkpoint is not None:
            if model is not None:
                raise AdapterError("give either checkpoint or model, not both")
            from harness.train.checkpoint import load_model_from_checkpoint
            model, self.state = load_model_from_checkpoint(checkpoint, self._device)
            if tokenizer is None:
                from harness.data import get_tokenizer
                spec = (self.state.get("config") or {}).get("data", {}).get("tokenizer", "byte")
                tokenizer = get_tokenizer(spec)
            self.checkpoint = str(checkpoint)
        elif model is None:
            raise AdapterError(f"--model {MODEL_TYPE} needs model_args checkpoint=PATH (a training checkpoint)")
        else:
            self.checkpoint = None
            model = model.to(self._device)
        if tokenizer is None:
            raise AdapterError("an in-memory model needs a tokenizer (harness.data.get_tokenizer())")
        if dtype not in _DTYPES:
            raise AdapterError(f"unknown dtype {dtype!r}; valid: float32, bfloat16, float16, auto")
        if _DTYPES[dtype] is not None:
            model = model.to(_DTYPES[dtype])
        self.model = model.eval()
        self.tokenizer = tokenizer
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise AdapterError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {vocab}")
        self._max_length = int(max_length or model.config.max_seq_len)
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        self.batch_size_per_gpu = self.batch_size
        self.max_gen_toks = int(max_gen_toks)
        self.use_cache = _as_bool(use_cache)
        self.logits_cache = _as_bool(logits_cache)
        self._warned_sampling = False
        self._warned_long = False

    # ------------------------------------------------------------------------------------------------ basics
    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records under results["config"]."""
        info: dict[str, Any] = {"model_type": MODEL_TYPE, "architecture": type(self.model).__name__,
                                "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                                "max_length": self.max_length, "tokenizer": self.tokenizer_name,
                                "checkpoint": self.checkpoint}
        if self.state is not None:
            info.update(model_name=self.state.get("model_name"), step=self.state.get("step"),
                        preset=(self.state.get("config") or {}).get("preset"))
        return info

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__)).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Iterable[int], **kwargs) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(list(tokens))

    @torch.inference_mode()
    def _model_call(self, inps: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits (float32)."""
        return self.model(inps).float()

    # ------------------------------------------------------------------------------------------ likelihoods
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(request_str, context ids, continuation ids) -> (log p(continuation | context), is greedy).

        A continuation longer than ``max_length`` (which HFLM rejects) is scored in consecutive pieces of
        ``max_length`` tokens, each conditioned on everything before it as far as the context reaches (the
        way rolling windows score a document): the chain rule, with the context truncated per piece."""
        L = self.max_length
        if all(len(c) <= L for _, _, c in requests):
            return self._score_tokens(requests, disable_tqdm, override_bs)
        if not self._warned_long:
            log.warning("continuations longer than the model's context (%d tokens) are scored in pieces of %d", L, L)
            self._warned_long = True
        pieces, owner = [], []
        for i, (request_str, ctx, cont) in enumerate(requests):
            if len(cont) <= L:
                pieces.append((request_str, ctx, cont))
                owner.append(i)
                continue
            for s in range(0, len(cont), L):
                pieces.append((None, ctx + cont[:s], cont[s:s + L]))
                owner.append(i)
        scores = self._score_tokens(pieces, disable_tqdm, override_bs)
        out = [[0.0, True] for _ in requests]
        for i, (lp, greedy) in zip(owner, scores):
            out[i][0] += lp
            out[i][1] = out[i][1] and greedy
        res = []
        for (request_str, _, cont), (lp, greedy) in zip(requests, out):
            res.append((lp, greedy))
            if len(cont) > L and request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, (lp, greedy))
        return res

    def _score_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        res = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=_lookup_one_token_cont)
        chunks = re_ord.get_batched(n=override_bs or self.batch_size, batch_fn=None)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests")
        L = self.max_length
        for chunk in chunks:
            inps, cont_toks_list, inplens = [], [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise AdapterError("loglikelihood needs a non-empty context and continuation")
                if len(continuation_enc) > L:
                    raise AdapterError(f"continuation of {len(continuation_enc)} tokens exceeds the model's "
                                       f"context of {L}")
                inp = (context_enc + continuation_enc)[-(L + 1):][:-1]
                inps.append(inp)
                cont_toks_list.append(continuation_enc)
                inplens.append(len(inp))
            padlen = max(inplens)
            batch = torch.full((len(inps), padlen), self.eot_token_id, dtype=torch.long)
            for i, inp in enumerate(inps):  # right padding: causal models never look ahead
                batch[i, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            multi_logits = F.log_softmax(self._model_call(batch.to(self.device)), dim=-1)
            for (request_str, ctx_tokens, _), logits, inplen, cont_toks in zip(
                    chunk, multi_logits, inplens, cont_toks_list):
                contlen = len(cont_toks)
                logits = logits[inplen - contlen:inplen].unsqueeze(0)  # [1, contlen, V]
                greedy_tokens = logits.argmax(dim=-1)
                for request_str, cont_toks, logits in re_ord.get_cache(
                        req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=logits):
                    cont = torch.tensor(cont_toks, dtype=torch.long, device=logits.device).unsqueeze(0)
                    max_equal = bool((greedy_tokens[:, -cont.shape[1]:] == cont).all())
                    lp = torch.gather(logits[:, -cont.shape[1]:], 2, cont.unsqueeze(-1)).squeeze(-1)
                    answer = (float(lp.sum()), max_equal)
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
                    pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
        """The (context, prediction) windows ``loglikelihood_rolling`` scores for ``string`` (as HFLM)."""
        return list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length, context_len=1)))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        all_windows, counts = [], []
        for (string,) in tqdm([req.args for req in requests], disable=(disable_tqdm or self.rank != 0),
                              desc="Tokenizing rolling windows"):
            windows = self.rolling_windows(string)
            all_windows.extend((None, ctx, cont) for ctx, cont in windows)
            counts.append(len(windows))
        scores = self._loglikelihood_tokens(all_windows, disable_tqdm=True) if all_windows else []
        out, i = [], 0
        for req, n in zip(requests, counts):
            total = float(sum(s for s, _ in scores[i:i + n]))
            i += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return out

    # ------------------------------------------------------------------------------------------- generation
    @torch.inference_mode()
    def greedy_generate(self, contexts: list[list[int]], max_new_tokens: int, stop=None,
                        use_cache: bool | None = None) -> list[list[int]]:
        """Greedy continuation of equal-length ``contexts`` (B lists of T ids), at most ``max_new_tokens`` each,
        never past ``max_length`` in total. A row stops at end-of-text (kept out of the output) or when
        ``stop(row_tokens)`` is true. With the cache: one (B, T) prefill then (B, 1) steps; without it, a full
        forward over the whole sequence for every new token (the reference the tests compare against)."""
        use_cache = self.use_cache if use_cache is None else use_cache
        T = len(contexts[0])
        if any(len(c) != T for c in contexts):
            raise AdapterError("greedy_generate needs equal-length contexts")
        budget = max(0, min(max_new_tokens, self.max_length - T))
        B = len(contexts)
        outs: list[list[int]] = [[] for _ in range(B)]
        done = [budget == 0] * B
        if budget == 0:
            return outs
        vocab = self.tokenizer.vocab_size
        seq = torch.tensor(contexts, dtype=torch.long, device=self.device)
        cache = None
        if use_cache:
            try:
                cache = self.model.allocate_cache(B, T + budget)
            except NotImplementedError:  # a model without the cache API: full forwards
                cache = None
        inp = seq
        for _ in range(budget):
            if cache is not None:
                logits = self.model.step(inp, cache)[:, -1].float()
            else:
                logits = self.model(seq)[:, -1].float()
            logits[:, vocab:] = float("-inf")  # ids the tokenizer cannot decode (vocabulary padding)
            nxt = logits.argmax(dim=-1)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                if tok == self.eot_token_id:
                    done[b] = True
                    continue
                outs[b].append(tok)
                if stop is not None and stop(outs[b]):
                    done[b] = True
            if all(done):
                break
            inp = nxt.unsqueeze(1)
            seq = torch.cat([seq, inp], dim=1)
        return outs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        res = []

        def _collate(req):
            toks = self.tok_encode(req[0])
            return -len(toks), req[0]

        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running generate_until requests")
        re_ords = Collator([reg.args for reg in requests], sort_fn=_collate, group_by="gen_kwargs",
                           group_fn=lambda x: x[1])
        # one batch per gen_kwargs group (sorted longest first); split further into equal prompt lengths below
        for chunk in re_ords.get_batched(n=0, batch_fn=None):
            contexts, all_gen_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_gen_kwargs[0]), self.max_gen_toks)
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("--model %s decodes greedily; do_sample/temperature are ignored", MODEL_TYPE)
                self._warned_sampling = True
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = [u for u in until if u]
            max_gen_toks = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            max_ctx = max(1, self.max_length - max_gen_toks)
            encoded = []
            for ctx in contexts:
                ids = self.tok_encode(ctx) or [self.prefix_token_id]
                encoded.append(ids[-max_ctx:])

            def stop(row, until=until):
                if not until:
                    return False
                text = self.tok_decode(row)
                return any(u in text for u in until)

            # group equal-length prompts (already adjacent: longest first), at most batch_size per batch
            i = 0
            results = [None] * len(encoded)
            while i < len(encoded):
                j = i
                while j < len(encoded) and j - i < self.batch_size and len(encoded[j]) == len(encoded[i]):
                    j += 1
                outs = self.greedy_generate(encoded[i:j], max_gen_toks, stop)
                for k, toks in enumerate(outs):
                    results[i + k] = postprocess_generated_text(self.tok_decode(toks), until, None)
                i = j
            for ctx, gk, s in zip(contexts, all_gen_kwargs, results):
                res.append(s)
                self.cache_hook.add_partial("generate_until", (ctx, gk), s)
                pbar.update(1)
        pbar.close()
        return re_ords.get_original(res)


def register() -> None:
    """Register :class:`HarnessLM` as lm-eval model type ``harness`` (idempotent)."""
    if MODEL_TYPE not in model_registry:
        model_registry.register(MODEL_TYPE)(HarnessLM)


register()
