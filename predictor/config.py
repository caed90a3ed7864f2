"""PredictorConfig: the predictor's hyper-parameters, validated in one place (errors name the key)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MODES = ("token_ahead", "layer_ahead")


class PredictorConfigError(ValueError):
    """A bad PredictorConfig value; the message names the key."""


def check_lookahead(value, num_layers: int | None = None, key: str = "lookahead") -> int:
    """The one check of a layer-ahead lookahead h: an int with 1 <= h (< num_layers when given).

    h = 0 would read the router's own input; h >= L leaves no layer to predict. Errors name `key`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PredictorConfigError(
            f"key '{key}' must be an int >= 1 (h = 0 would read the router's own input), got {value!r}"
        )
    if num_layers is not None and value >= num_layers:
        raise PredictorConfigError(
            f"key '{key}' must be below the number of MoE layers ({num_layers}), got {value!r}"
        )
    return value


LEGACY_KEYS = ("extra", "bank_entries")  # keys of files written before the redesign, dropped on load


@dataclass
class PredictorConfig:
    """Hyper-parameters of ExpertPredictor. Construction validates (errors name the key); the derived
    fields (`depth_width`, `ahead`, `contributors`) are properties, so they can never disagree."""

    vocab_size: int
    num_layers: int  # L: MoE layers
    num_experts: int  # E: routed experts per layer
    top_k: int  # k: routed experts per token and layer
    mode: str = "token_ahead"  # the head (predictor/heads.py): "token_ahead" | "layer_ahead"
    lookahead: int = 1  # h: layer_ahead predicts layer l from the current token's layers <= l - h
    d_model: int = 128
    n_heads: int = 4
    n_blocks: int = 2  # context transformer blocks (over tokens)
    depth_blocks: int = 1  # depth transformer blocks (over layers), layer_ahead only
    d_depth: int | None = None  # width of the depth transformer; None = d_model
    depth_heads: int = 4
    # layer_ahead: depth position l also embeds layer l - h alone, next to the running sum over
    # layers <= l - h (the nearest layer tells the most; the sum dilutes it)
    depth_last: bool = False
    # logit contributors (predictor/contributors.py), each on when configured:
    skip_tables: bool = True  # learned (L*E x L*E) tables from routed experts straight to the logits
    memory_heads: int = 0  # routing memory over the last memory_size tokens (predictor/memory.py)
    memory_head_dim: int = 16
    memory_size: int = 256
    bank_size: int = 0  # routing bank rows kept per token id, layer_ahead only (predictor/bank.py)
    bank_recent: int = 0  # the prompt's own last bank_recent tokens vote with the bank's rows
    bank_beta: float = 2.0  # vote sharpness: softmax over rows of beta * decayed routing overlap
    bank_decay: float = 0.7  # weight of layer l - h - j in that overlap: decay ** j
    # the cross-layer gate's top-G picks for layer l (traces recorded with collect.py record_gate_ahead),
    # read when predicting layer l (layer_ahead, h = 1): they are known once layer l - 1 has run, so
    # such a predictor's layer-l prediction comes then (`timing` layer_output), not at its routing
    gate_inputs: int = 0
    mlp_ratio: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> PredictorConfig:
        def bad(key: str, why: str) -> PredictorConfigError:
            return PredictorConfigError(f"PredictorConfig: key '{key}' {why}, got {getattr(self, key)!r}")

        positive = ("vocab_size", "num_layers", "num_experts", "top_k", "d_model", "n_heads", "mlp_ratio",
                    "depth_heads", "memory_head_dim", "memory_size")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(key, "must be a positive int")
        for key in ("n_blocks", "depth_blocks", "memory_heads", "bank_size", "bank_recent", "gate_inputs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(key, "must be a non-negative int")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"must not exceed num_experts={self.num_experts}")
        if self.mode not in MODES:
            raise bad("mode", f"must be one of {MODES}")
        try:
            check_lookahead(self.lookahead, self.num_layers if self.mode == "layer_ahead" else None)
        except PredictorConfigError as e:
            raise PredictorConfigError(f"PredictorConfig: {e}") from None
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
        if self.gate_inputs and (self.mode != "layer_ahead" or self.lookahead != 1):
            raise bad("gate_inputs", "needs mode='layer_ahead' with lookahead=1 (the gate's picks for layer l come "
                                     "after layer l - 1 has run)")
        if self.gate_inputs > self.num_experts:
            raise bad("gate_inputs", f"must not exceed num_experts={self.num_experts}")
        if not (isinstance(self.bank_beta, (int, float)) and self.bank_beta > 0):
            raise bad("bank_beta", "must be a positive number")
        if not (isinstance(self.bank_decay, (int, float)) and 0 < self.bank_decay <= 1):
            raise bad("bank_decay", "must lie in (0, 1]")
        return self

    @property
    def depth_width(self) -> int:
        return self.d_depth or self.d_model

    @property
    def ahead(self) -> int | None:
        """Layers of the current token read before predicting a layer: h (layer_ahead), None (token_ahead)."""
        return self.lookahead if self.mode == "layer_ahead" else None

    @property
    def timing(self) -> str:
        """When a layer's prediction is known (predictor/simulate/run.py MODES): token_ahead, layer_ahead
        (layer l - h has routed) or layer_output (layer l - 1 has run: the gate's picks are read)."""
        return "layer_output" if self.gate_inputs else self.mode

    @property
    def contributors(self) -> tuple[str, ...]:
        """Names of the configured logit contributors, in the order the model sums them."""
        on = {"skip": self.skip_tables, "memory": self.memory_heads > 0, "bank": self.bank_size > 0,
              "gate": self.gate_inputs > 0}  # fmt: skip
        return tuple(name for name, enabled in on.items() if enabled)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PredictorConfig:
        """Build and validate from a mapping; keys of older files (LEGACY_KEYS) are dropped."""
        data = {k: v for k, v in data.items() if k not in LEGACY_KEYS and k != "_target_"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PredictorConfigError(f"PredictorConfig: unknown keys {unknown}")
        missing = [k for k in ("vocab_size", "num_layers", "num_experts", "top_k") if k not in data]
        if missing:
            raise PredictorConfigError(f"PredictorConfig: missing keys {missing}")
        return cls(**data)
