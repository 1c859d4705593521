"""The lm-eval adapter scores exactly what lm-eval's HF backend would: rolling windows, batching, generation."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from harness.data import get_tokenizer  # noqa: E402
from harness.evaluate.adapter import DEFAULT_BATCH_SIZE, AdapterError, HarnessLM, parse_batch_size  # noqa: E402
from harness.train.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from models import registry  # noqa: E402

TOK = get_tokenizer("byte")
EOT = TOK.eot_id


def _model(name="tokenformer", max_seq_len=32):
    torch.manual_seed(0)
    return registry.build(name, "tiny", vocab_size=320, max_seq_len=max_seq_len).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _lm(model, **kw):
    return HarnessLM(model=model, tokenizer=TOK, device="cpu", **kw)


def _req(*args):
    return SimpleNamespace(args=args)


def _logprobs(model, inp):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([inp])).float(), dim=-1)[0]


def test_rolling_loglikelihood_short_document_is_one_full_forward(model):
    text = "To be, or not to be."  # 20 bytes < 32
    ids = TOK.encode(text)
    lp = _logprobs(model, [EOT] + ids[:-1])
    expected = float(sum(lp[i, t] for i, t in enumerate(ids)))
    (got,) = _lm(model).loglikelihood_rolling([_req(text)])
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_rolling_loglikelihood_long_document_is_the_windowed_sum(model):
    text = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
            "that lour'd upon our house")
    ids = TOK.encode(text)
    n, L = len(ids), 32
    assert n > 3 * L and n % L != 0
    # by hand: window 1 = EOT + first 31 tokens, predicting the first 32; then disjoint windows of 32 predictions
    # conditioned on the token just before them; the last (partial) window sees the full 32-token context
    total, starts = 0.0, list(range(0, n, L))
    for s in starts:
        e = min(s + L, n)
        if s == 0:
            inp = [EOT] + ids[:L - 1]
        else:
            inp = ids[e - L - 1:e - 1]
        lp = _logprobs(model, inp)
        k = e - s
        total += float(sum(lp[len(inp) - k + j, ids[s + j]] for j in range(k)))
    lm = _lm(model, batch_size=3)
    assert len(lm.rolling_windows(text)) == len(starts)
    (got,) = lm.loglikelihood_rolling([_req(text)])
    assert got == pytest.approx(total, rel=1e-5, abs=1e-4)


def test_loglikelihood_independent_of_batch_size_and_truncates_left(model):
    reqs = [_req("The quick brown fox", " jumps"), _req("A", " b"), _req("", "hello"),
            _req("x" * 80, " over the lazy dog"), _req("Question: why?\nAnswer:", " because"),
            _req("Question: why?\nAnswer:", " no"), _req("one two three four five six", " seven")]
    one = _lm(model, batch_size=1).loglikelihood(reqs)
    many = _lm(model, batch_size=5).loglikelihood(reqs)
    nocache = _lm(model, batch_size=7, logits_cache=False).loglikelihood(reqs)
    for a, b, c in zip(one, many, nocache):
        assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-4) and a[1] == b[1]
        assert a[0] == pytest.approx(c[0], rel=1e-5, abs=1e-4) and a[1] == c[1]
    # the 80-byte context was left-truncated: score = the last 32 tokens' window
    ctx, cont = TOK.encode("x" * 80), TOK.encode(" over the lazy dog")
    inp = (ctx + cont)[-33:][:-1]
    lp = _logprobs(model, inp)
    expected = float(sum(lp[len(inp) - len(cont) + j, t] for j, t in enumerate(cont)))
    assert one[3][0] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # empty context: conditioned on end-of-text
    lp = _logprobs(model, [EOT] + TOK.encode("hello")[:-1])
    assert one[2][0] == pytest.approx(float(sum(lp[i, t] for i, t in enumerate(TOK.encode("hello")))), rel=1e-5)


def test_continuation_longer_than_context_is_scored_in_pieces(model):
    ctx, cont = "Once upon a time", " " + "there was a long story that went on and on " * 2
    assert len(TOK.encode(cont)) > 32
    (got,) = _lm(model).loglikelihood([_req(ctx, cont)])
    c, t = TOK.encode(ctx), TOK.encode(cont)
    total = 0.0
    for s in range(0, len(t), 32):
        piece = t[s:s + 32]
        inp = (c + t[:s] + piece)[-33:][:-1]
        lp = _logprobs(model, inp)
        total += float(sum(lp[len(inp) - len(piece) + j, x] for j, x in enumerate(piece)))
    assert got[0] == pytest.approx(total, rel=1e-5, abs=1e-4)


def _reference_generate(model, prompt, max_new, until):
    """Greedy argmax by a full forward over the whole sequence for every new token (no cache)."""
    ids = TOK.encode(prompt)[-(32 - max_new):]
    out = []
    for _ in range(min(max_new, 32 - len(ids))):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1].float()
        logits[TOK.vocab_size:] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == EOT:
            break
        out.append(nxt)
    text = TOK.decode(out)
    for u in until:
        text = text.split(u)[0]
    return text


@pytest.mark.parametrize("name", ["tokenformer", "mamba", "gpt2"])
def test_generate_until_with_cache_equals_full_forwards(name):
    model = _model(name)
    prompts = ["Hello, world", "Hello, World", "abc", "The end is near", "The end is far.", "Z"]
    until = ["\n\n", "q"]
    gen = {"until": until, "max_gen_toks": 12, "do_sample": False}
    lm = _lm(model, batch_size=2)
    got = lm.generate_until([_req(p, dict(gen)) for p in prompts])
    want = [_reference_generate(model, p, 12, until) for p in prompts]
    assert got == want
    # and the low-level decoder, cached vs uncached, token for token
    ctx = [TOK.encode("Hello, world"), TOK.encode("Hello, World")]
    assert lm.greedy_generate(ctx, 10, use_cache=True) == lm.greedy_generate(ctx, 10, use_cache=False)


class _Counter(torch.nn.Module):
    """Predicts byte + 1, and end-of-text after 'k': generation is known in advance."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=32, vocab_size=320)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        nxt = torch.where(ids == ord("k"), torch.full_like(ids, EOT), (ids + 1) % 256)
        return F.one_hot(nxt, 320).float() * 10 + self.w

    def allocate_cache(self, batch, max_len):
        return SimpleNamespace(pos=0, max_len=max_len)

    def step(self, ids, cache):
        cache.pos += ids.shape[1]
        assert cache.pos <= cache.max_len
        return self.forward(ids)


def test_generate_until_stops_at_eot_stop_strings_and_budget():
    lm = _lm(_Counter(), batch_size=4)
    reqs = [_req("abc", {"until": ["g"], "max_gen_toks": 20}), _req("abc", {"until": [], "max_gen_toks": 20}),
            _req("xyz", {"until": ["\n"], "max_gen_toks": 3}), _req("", {"until": "ef", "max_gen_toks": 10}),  # EOT+1
            _req("a" * 40, {"until": ["zz"], "max_gen_toks": 4})]
    assert lm.generate_until(reqs) == ["def", "defghijk", "{|}", "".join(map(chr, range(1, 11))), "bcde"]
    assert lm.greedy_generate([TOK.encode("abc")], 20, use_cache=False) == [list(b"defghijk")]


def test_batch_size_and_arguments():
    assert parse_batch_size("auto") == DEFAULT_BATCH_SIZE and parse_batch_size("auto:4") == DEFAULT_BATCH_SIZE
    assert parse_batch_size("8") == 8 and parse_batch_size(3) == 3 and parse_batch_size(None) == DEFAULT_BATCH_SIZE
    assert parse_batch_size("auto", max_batch_size=4) == 4
    with pytest.raises(AdapterError, match="batch_size"):
        parse_batch_size("big")
    with pytest.raises(AdapterError, match="checkpoint=PATH"):
        HarnessLM()
    with pytest.raises(AdapterError, match="unknown model_args.*pretrainedd"):
        HarnessLM(pretrainedd="x")


def test_registered_as_lm_eval_model_type(tmp_path):
    from lm_eval.api.registry import get_model
    assert get_model("harness") is HarnessLM
    model = _model()
    save_checkpoint(tmp_path / "ck", model, None, {"step": 0, "model_name": "tokenformer",
                                                   "model_config": model.config.to_dict(),
                                                   "config": {"data": {"tokenizer": "byte"}}})
    lm = get_model("harness").create_from_arg_string(f"checkpoint={tmp_path / 'ck'},max_gen_toks=5",
                                                     {"batch_size": "auto", "max_batch_size": None, "device": "cpu"})
    assert lm.batch_size == DEFAULT_BATCH_SIZE and lm.max_length == 32 and lm.max_gen_toks == 5
    assert lm.eot_token_id == EOT and lm.get_model_info()["model_name"] == "tokenformer"
    ref = _lm(model).loglikelihood([_req("ab", "cd")])
    assert lm.loglikelihood([_req("ab", "cd")])[0][0] == pytest.approx(ref[0][0], rel=1e-6)


def test_checkpoint_of_unknown_architecture_is_one_line(tmp_path, capsys):
    from harness.cli import main
    model = _model()
    save_checkpoint(tmp_path / "ck", model, None, {"step": 0, "model_name": "nosuchnet",
                                                   "model_config": model.config.to_dict()})
    with pytest.raises(CheckpointError, match="unknown architecture"):
        HarnessLM(checkpoint=tmp_path / "ck")
    assert main(["eval", str(tmp_path / "ck"), "--tasks", "piqa", "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: error:") and "unknown architecture" in err and len(err.splitlines()) == 1
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
