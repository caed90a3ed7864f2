"""Token-space identity: which token each id means, for trace sets and predictors.

Token ids only mean something together with the vocabulary that assigned them. Every trace set
(`TraceMeta.token_space`) and every exported predictor (its `meta["token_space"]`) names its space:

    tokenizer:sha256:<16 hex> ids of a real tokenizer, the hash of its vocabulary (id -> token
                              string), as recorded by `collect.py`, the engine importers (`python -m
                              predictor.importers`) and the runtime, which all call `tokenizer_space`:
                              a Hub name, its local snapshot and the same directory by an absolute or a
                              relative path are one space
    tokenizer:<name>          the same when the tokenizer could not be read where the identity was made
                              (a Hub name not in the local cache), and in files written before the hash
    vocab:sha256:<16 hex>     ids assigned by an import from token strings (`vocab.json`, e.g. the
                              MoE-Beyond import), the hash of that list

Stages that bring two of them together (evaluation, statistics with --train-data, training on several
trace sets, the runtime) call `check_token_space`, which refuses different identities with an error
naming both; a `tokenizer:<name>` is first read as the tokenizer it names, where that can be done here
without a network. Files written before the field existed carry none: they load, with a
TokenSpaceWarning, and are not refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

UNK = "<unk>"  # the vocabulary entry that strings a `--vocab` import has never seen map to
PREFIXES = ("tokenizer:", "vocab:sha256:")


class TokenSpaceError(ValueError):
    """Two token-id spaces that differ; the message names both."""


class TokenSpaceWarning(UserWarning):
    """A trace set or predictor without a token-space identity (written before it was recorded)."""


HASHED = "tokenizer:sha256:"


def tokenizer_space(tokenizer) -> str:
    """The identity of a real tokenizer's ids: `tokenizer:sha256:<hash of its vocabulary>` for a loaded
    tokenizer (anything with `get_vocab()`) or a name it can be loaded from here without a network (a
    local directory, a Hub name in the local cache); else `tokenizer:<name>`, the name normalised so
    that `./org/model/` and `org/model` agree, or, for a directory that exists but holds no readable
    tokenizer, its absolute path (with a warning: two relative paths in different places must not
    agree by their spelling)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])  # [(string, id)] in id order
        data = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return HASHED + hashlib.sha256(data).hexdigest()[:16]
    name = str(tokenizer).strip()
    if not name:
        raise ValueError("tokenizer name is empty")
    key = _key(name)
    try:
        return _read_local(key)[0]
    except Exception as e:  # any reason it cannot be read here (not kept: a directory may appear later)
        if os.path.isdir(name):  # a directory that is there but holds no readable tokenizer
            warnings.warn(f"tokenizer directory {key} cannot be read ({type(e).__name__}: {e}); its ids are "
                          "known by its absolute path, not by its vocabulary", TokenSpaceWarning, stacklevel=2)
            return "tokenizer:" + key.replace(os.sep, "/")
        return "tokenizer:" + os.path.normpath(name).replace(os.sep, "/")


def tokenizer_vocab_size(name: str) -> int | None:
    """How many ids the tokenizer `name` has (its added tokens included), read without a network; None
    where it cannot be read here."""
    try:
        return _read_local(_key(name))[1]
    except Exception:  # noqa: BLE001 - not readable here: the ids stay unchecked against it, as before
        return None


def _key(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name  # a relative path means its directory


def _read_local(key: str) -> tuple[str, int]:
    """(token space, number of ids) of the tokenizer `key` names, read once without a network and kept;
    raises whatever reading it raised (not kept: a directory may appear later)."""
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(key, local_files_only=True)
        _TOKENIZERS[key] = (tokenizer_space(loaded), len(loaded))
    return _TOKENIZERS[key]


_TOKENIZERS: dict[str, tuple[str, int]] = {}  # name or directory -> what _read_local read there


def _read(space: str | None) -> str | None:
    """A `tokenizer:<name>` identity as the hash of the tokenizer it names, where that can be read here."""
    if space and space.startswith("tokenizer:") and not space.startswith(HASHED):
        return tokenizer_space(space.removeprefix("tokenizer:"))
    return space


def vocab_space(vocab: list[str]) -> str:
    """The identity of ids assigned from a list of token strings (index = id): a hash of the list."""
    data = json.dumps(list(vocab), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "vocab:sha256:" + hashlib.sha256(data).hexdigest()[:16]


def default_token_space(tokenizer: str | None, vocab: list[str] | None) -> str | None:
    """What a new trace set records when its writer named no space: the vocabulary's hash when the
    ids come from a vocabulary, else the tokenizer's identity (`tokenizer_space`), else None."""
    if vocab is not None:
        return vocab_space(vocab)
    return tokenizer_space(tokenizer) if tokenizer else None


def token_space_problems(token_space, unk_token_id=None, vocab_size=None) -> list[tuple[str, str]]:
    """(key, why) for each problem of a trace meta's `token_space` and `unk_token_id` (TraceMeta.validate)."""
    out = []
    if token_space is not None and (not isinstance(token_space, str) or not token_space.startswith(PREFIXES)):
        out.append(("token_space", f"must start with one of {PREFIXES}, got {token_space!r}"))
    if unk_token_id is not None and not 0 <= unk_token_id < (vocab_size or 0):
        out.append(("unk_token_id", f"= {unk_token_id} outside [0, vocab_size={vocab_size})"))
    return out


def check_token_space(a: str | None, a_what: str, b: str | None, b_what: str) -> None:
    """Refuse two different token spaces; warn (and go on) when either side has none recorded, or when a
    tokenizer's name meets a tokenizer's hash and the named one cannot be read here."""
    if a is None or b is None:
        missing = a_what if a is None else b_what
        warnings.warn(
            f"{missing} records no token space (written before token spaces were recorded): cannot check "
            f"that its token ids mean the same tokens as those of {b_what if a is None else a_what}",
            TokenSpaceWarning,
            stacklevel=2,
        )
        return
    if a == b:
        return
    ra, rb = _read(a), _read(b)
    if ra == rb:
        return
    unread = [s for s in (ra, rb) if s.startswith("tokenizer:") and not s.startswith(HASHED)]
    if len(unread) == 1 and any(s.startswith(HASHED) for s in (ra, rb)):  # a tokenizer's name against a tokenizer's hash
        warnings.warn(
            f"cannot check that the token ids of {a_what} ({ra!r}) and {b_what} ({rb!r}) mean the same tokens: "
            f"the tokenizer {unread[0].removeprefix('tokenizer:')!r} cannot be read here (offline, not cached)",
            TokenSpaceWarning,
            stacklevel=2,
        )
        return
    raise TokenSpaceError(
        f"token ids of {a_what} (token space {a!r}) and {b_what} (token space {b!r}) mean different "
        "tokens; use trace sets recorded with the same tokenizer, or import prompt sets into one id "
        "space with `python -m predictor.moebeyond --vocab <vocab.json of the other set>`"
    )
