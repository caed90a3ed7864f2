"""Token-space identity: which token each id means, for trace sets and predictors.

Token ids only mean something together with the vocabulary that assigned them. Every trace set
(`TraceMeta.token_space`) and every exported predictor (its `meta["token_space"]`) names its space:

    tokenizer:<name>          ids of a real tokenizer (a Hugging Face name or path), as recorded by
                              `collect.py`, the engine importers (`python -m predictor.importers`)
                              and the runtime, which all call `tokenizer_space(name)`
    vocab:sha256:<16 hex>     ids assigned by an import from token strings (`vocab.json`, e.g. the
                              MoE-Beyond import), the hash of that list

Stages that bring two of them together (evaluation, statistics with --train-data, training on several
trace sets, the runtime) call `check_token_space`, which refuses different identities with an error
naming both. Files written before the field existed carry none: they load, with a TokenSpaceWarning,
and are not refused.
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


def tokenizer_space(name: str) -> str:
    """The identity of a real tokenizer's ids: `tokenizer:<name>`, the name normalised so that
    `./data/demo/model/` and `data/demo/model` agree (a hub name is kept as it is)."""
    name = str(name).strip()
    if not name:
        raise ValueError("tokenizer name is empty")
    return "tokenizer:" + os.path.normpath(name).replace(os.sep, "/")


def vocab_space(vocab: list[str]) -> str:
    """The identity of ids assigned from a list of token strings (index = id): a hash of the list."""
    data = json.dumps(list(vocab), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return "vocab:sha256:" + hashlib.sha256(data).hexdigest()[:16]


def default_token_space(tokenizer: str | None, vocab: list[str] | None) -> str | None:
    """What a new trace set records when its writer named no space: the vocabulary's hash when the
    ids come from a vocabulary, else the tokenizer's name, else None."""
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
    """Refuse two different token spaces; warn (and go on) when either side has none recorded."""
    if a is None or b is None:
        missing = a_what if a is None else b_what
        warnings.warn(
            f"{missing} records no token space (written before token spaces were recorded): cannot check "
            f"that its token ids mean the same tokens as those of {b_what if a is None else a_what}",
            TokenSpaceWarning,
            stacklevel=2,
        )
        return
    if a != b:
        raise TokenSpaceError(
            f"token ids of {a_what} (token space {a!r}) and {b_what} (token space {b!r}) mean different "
            "tokens; use trace sets recorded with the same tokenizer, or import prompt sets into one id "
            "space with `python -m predictor.moebeyond --vocab <vocab.json of the other set>`"
        )
