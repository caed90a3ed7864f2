"""PredictorConfig: the predictor's hyper-parameters, validated in one place (errors name the key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

MODES = ("token_ahead", "layer_ahead")


class PredictorConfigError(ValueError):
    """A bad PredictorConfig value; the message names the key."""


def check_lookahead(value, num_layers: int | None = None, key: str = "lookahead") -> int:
    """The one check of a layer-ahead lookahead h: an int with 1 <= h (< num_layers when given).

    h = 0 would read the router's own input; h >= L leaves no layer to predict. Errors name `key`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PredictorConfigError(
            f"{key} must be an int >= 1 (h = 0 would read the router's own input), got {value!r}"
        )
    if num_layers is not None and value >= num_layers:
        raise PredictorConfigError(f"{key}={value} must be below the number of MoE layers ({num_layers})")
    return value


@dataclass
class PredictorConfig:
    vocab_size: int
    num_layers: int  # L: MoE layers
    num_experts: int  # E: routed experts per layer
    top_k: int  # k: routed experts per token and layer
    mode: str = "token_ahead"  # "token_ahead" | "layer_ahead"
    lookahead: int = 1  # h: layer_ahead predicts layer l from the current token's layers <= l - h
    d_model: int = 128
    n_heads: int = 4
    n_blocks: int = 2  # context transformer blocks (over tokens)
    depth_blocks: int = 1  # depth transformer blocks (over layers), layer_ahead only
    d_depth: int | None = None  # width of the depth transformer; None = d_model
    depth_heads: int = 4
    # layer_ahead: depth position l also gets its own embedding of layer l - h alone, next to the running
    # sum over layers <= l - h (the nearest layer is the most telling; the sum dilutes it)
    depth_last: bool = False
    # additive "wide" paths straight to the logits: a learned (L*E x L*E) table from the previous token's
    # experts at all layers (and, layer_ahead, from the current token's experts at layers <= l - h)
    skip_tables: bool = True
    # routing memory (predictor/memory.py): attention from (t, l) over the last memory_size tokens, reading
    # how each routed at layer l; 0 heads = off
    memory_heads: int = 0
    memory_head_dim: int = 16
    memory_size: int = 256
    # routing bank (predictor/bank.py, layer_ahead only): a vote over the training-set occurrences of the
    # current token, weighted by how their routing at layers <= l - h agrees with the token's own;
    # bank_size = rows kept per token id (0 = off), bank_entries = rows stored (train() sets it from data),
    bank_size: int = 0
    bank_entries: int = 0
    # and bank_recent > 0 lets the prompt's own last bank_recent tokens of the same id vote too (serving
    # keeps them in a ring buffer: a bank that grows with the prompt being served)
    bank_recent: int = 0
    bank_beta: float = 2.0
    bank_decay: float = 0.7
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    extra: dict = field(default_factory=dict)  # free-form notes kept in exports

    def validate(self) -> PredictorConfig:
        def bad(key: str, why: str) -> PredictorConfigError:
            return PredictorConfigError(f"PredictorConfig: key '{key}' {why}, got {getattr(self, key)!r}")

        for key in (
            "vocab_size",
            "num_layers",
            "num_experts",
            "top_k",
            "d_model",
            "n_heads",
            "mlp_ratio",
            "depth_heads",
            "memory_head_dim",
            "memory_size",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, "must be a positive int")
        for key in ("n_blocks", "depth_blocks", "memory_heads", "bank_size", "bank_entries", "bank_recent"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise bad(key, "must be a non-negative int")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"must not exceed num_experts={self.num_experts}")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}")
        if not isinstance(self.lookahead, int) or self.lookahead < 1:
            raise bad("lookahead", "must be an int >= 1 (h = 0 would read the router's own input)")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise bad("n_heads", f"must divide d_model={self.d_model} into an even head size")
        if self.d_depth is not None and (not isinstance(self.d_depth, int) or self.d_depth <= 0):
            raise bad("d_depth", "must be a positive int or None")
        if self.mode == "layer_ahead" and self.depth_width % self.depth_heads:
            raise bad("depth_heads", f"must divide the depth width {self.depth_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must lie in [0, 1)")
        if self.bank_size and self.mode != "layer_ahead":
            raise bad("bank_size", "needs mode='layer_ahead' (the bank votes from the current token's routing)")
        if self.bank_recent and not self.bank_size:
            raise bad("bank_recent", "needs a routing bank (bank_size > 0)")
        if not (isinstance(self.bank_beta, (int, float)) and self.bank_beta > 0):
            raise bad("bank_beta", "must be a positive number")
        if not (isinstance(self.bank_decay, (int, float)) and 0 < self.bank_decay <= 1):
            raise bad("bank_decay", "must lie in (0, 1]")
        return self

    @property
    def depth_width(self) -> int:
        return self.d_depth or self.d_model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PredictorConfigError(f"PredictorConfig: unknown keys {unknown}")
        missing = [k for k in ("vocab_size", "num_layers", "num_experts", "top_k") if k not in data]
        if missing:
            raise PredictorConfigError(f"PredictorConfig: missing keys {missing}")
        return cls(**data).validate()


# --------------------------------------------------------------------------- building blocks
