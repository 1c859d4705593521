"""Tokenizer files for an exported model, and the tokenizer an imported checkpoint should name.

Export writes ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``) that
``AutoTokenizer`` loads as a ``PreTrainedTokenizerFast``, for the tokenizers the harness has offline: ``byte``
(built here: a byte-level BPE without merges, whose ids are exactly the bytes, end-of-text 256), ``gpt2``,
``neox`` and tokenizer.json paths. When the files are not installed the export goes on without them and says so.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.data.errors import DataError

EOT = "<|endoftext|>"
NAMED = ("byte", "gpt2", "neox")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """The harness's byte tokenizer as a ``tokenizers.Tokenizer``: token id == byte value, EOT = 256."""
    import tokenizers as tk
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[EOT] = 256
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    # no regex split and no prefix space: every byte of the text is one token, nothing added
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def write_tokenizer(out: Path, spec: str, max_len: int) -> tuple[int | None, str]:
    """Write the files of tokenizer ``spec`` into ``out``. Returns (end-of-text id or None, a note)."""
    from harness.data.tokenizers import get_tokenizer, neox_file
    try:
        if spec == "byte":
            byte_tokenizer().save(str(out / "tokenizer.json"))
            eot_id, eot = 256, EOT
        else:
            tok = get_tokenizer(spec)  # DataError when its files are not installed
            if spec == "gpt2":  # built from OpenAI's two files: write the assembled tokenizer.json
                tok._tok.save(str(out / "tokenizer.json"))
            else:  # neox, or a tokenizer.json path: the file itself, byte for byte
                shutil.copyfile(neox_file() if spec == "neox" else Path(spec).expanduser(), out / "tokenizer.json")
            eot_id, eot = tok.eot_id, tok._tok.id_to_token(tok.eot_id)
    except (DataError, ImportError, OSError) as e:
        return None, f"no tokenizer files written ({spec}: {str(e).splitlines()[0]})"
    special = {"bos_token": eot, "eos_token": eot}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, **special}, indent=1))
    return eot_id, f"tokenizer files written ({spec})"


def guess_tokenizer(vocab: int) -> tuple[str, str]:
    """A named tokenizer for a checkpoint that names none, from its vocabulary size: the released
    Mamba / TokenFormer / Pythia models use GPT-NeoX-20B's (harness ``neox``: 50280 ids)."""
    if vocab >= 50280:
        return "neox", f"guessed neox from the vocabulary ({vocab} >= 50280)"
    if vocab >= 50257:
        return "gpt2", f"guessed gpt2 from the vocabulary ({vocab})"
    return "byte", f"guessed byte from the vocabulary ({vocab}); pass --tokenizer if that is wrong"
