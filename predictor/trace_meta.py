"""A trace set's `trace_meta.json`: which model the routing came from, its shape, and how it was recorded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .token_space import token_space_problems
from .trace_rows import TOKEN_ID_MAX, TraceFormatError

FORMAT_VERSION = 1

# what each TraceMeta annotation admits in trace_meta.json (bools are not ints), and how errors say it
_KINDS = {"int": ("an int", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          "str": ("a string", lambda v: isinstance(v, str)), "bool": ("true or false", lambda v: isinstance(v, bool)),
          "dict": ("an object", lambda v: isinstance(v, dict)), "None": ("null", lambda v: v is None),
          "list[int]": ("a list of ints", lambda v: isinstance(v, list) and all(_KINDS["int"][1](x) for x in v))}


@dataclass
class TraceMeta:
    source_model: str
    architecture: str
    num_layers: int  # decoder layers of the model, dense ones included
    moe_layers: list[int]  # decoder-layer index of each MoE layer; L = len(moe_layers)
    num_experts: int  # routed experts per MoE layer (E)
    top_k: int  # routed experts per token (k)
    num_shared_experts: int = 0  # always-on experts, not listed in the traces
    vocab_size: int | None = None  # size of the token-id space
    tokenizer: str | None = None  # HF tokenizer (path or name) whose ids are stored
    vocab_file: str | None = None  # "vocab.json" when ids were assigned by an import
    token_space: str | None = None  # what the ids mean (predictor/token_space.py); None: written before it
    unk_token_id: int | None = None  # the id of strings a `--vocab` import had never seen
    prompt_source: str = ""
    recording: dict = field(default_factory=dict)  # how it was recorded (prefill/generate, dtype, ...)
    has_weights: bool = False
    gate_ahead: int = 0  # B: width of the `gate_ahead` column (0: not recorded)
    # shape of one expert, for simulator and benchmark presets: {"hidden": H, "intermediate": I,
    # "num_matrices": 3, "dtype_bytes": 2, "bytes": B (recorded: the tensors' own size, biases included)}
    expert_shape: dict | None = None
    num_sequences: int = 0
    num_tokens: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_dtype(self) -> str:
        return "uint8" if self.num_experts <= 256 else "int16"

    def validate(self, where: str = "trace meta") -> None:
        def bad(key: str, why: str) -> TraceFormatError:
            return TraceFormatError(f"{where}: key '{key}' {why}")

        for key in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise bad(key, f"must be a positive int, got {value!r}")
        if not self.moe_layers:
            raise bad("moe_layers", "must list at least one MoE layer")
        if sorted(set(self.moe_layers)) != list(self.moe_layers):
            raise bad("moe_layers", f"must be strictly increasing, got {self.moe_layers}")
        if self.moe_layers[0] < 0 or self.moe_layers[-1] >= self.num_layers:
            raise bad("moe_layers", f"must lie in [0, num_layers={self.num_layers}), got {self.moe_layers}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise bad("num_shared_experts", f"must be an int >= 0, got {self.num_shared_experts!r}")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"= {self.top_k} exceeds num_experts = {self.num_experts}")
        if not isinstance(self.gate_ahead, int) or not (self.gate_ahead == 0 or self.top_k <= self.gate_ahead <= self.num_experts):
            raise bad("gate_ahead", f"must be 0 or in [top_k, num_experts] = [{self.top_k}, {self.num_experts}], "
                                    f"got {self.gate_ahead!r}")
        size = (self.expert_shape or {}).get("bytes")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise bad("expert_shape", f"bytes must be a positive int (the simulator charges it), got {size!r}")
        if self.num_experts > 32767:
            raise bad("num_experts", f"= {self.num_experts} does not fit int16 expert ids")
        if self.vocab_size is not None and not 0 < self.vocab_size <= TOKEN_ID_MAX + 1:
            raise bad("vocab_size", f"must be in [1, {TOKEN_ID_MAX + 1}] (int32 token ids), got {self.vocab_size}")
        for key, why in token_space_problems(self.token_space, self.unk_token_id, self.vocab_size):
            raise bad(key, why)
        if self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"= {self.format_version}, this code reads {FORMAT_VERSION}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "trace meta") -> TraceMeta:
        """A checked TraceMeta from parsed JSON; a wrong key, a missing key or a value of the wrong type
        (a hand-edited or foreign file) is a TraceFormatError naming `where` and the key, never a TypeError."""
        if not isinstance(data, dict):
            raise TraceFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TraceFormatError(f"{where}: unknown keys {unknown}")
        required = ["source_model", "architecture", "num_layers", "moe_layers", "num_experts", "top_k"]
        missing = [k for k in required if k not in data]
        if missing:
            raise TraceFormatError(f"{where}: missing keys {missing}")
        for f in fields(cls):  # annotations are strings here (`from __future__ import annotations`)
            kinds = [_KINDS[t.strip()] for t in f.type.split("|")]
            if f.name in data and not any(ok(data[f.name]) for _, ok in kinds):
                raise TraceFormatError(f"{where}: key '{f.name}' must be {' or '.join(w for w, _ in kinds)}, "
                                       f"got {data[f.name]!r}")
        meta = cls(**data)
        meta.validate(where)
        return meta


def read_meta_file(meta_path: Path) -> TraceMeta:
    """A trace set's `trace_meta.json`, checked; errors name the file."""
    try:
        with open(meta_path, "rb") as f:
            raw = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise TraceFormatError(f"{meta_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    return TraceMeta.from_dict(raw, str(meta_path))
