"""Tiny random-weight MoE causal LMs, one per architecture, plus a tiny tokenizer (tests only).

Shapes are small enough that a forward pass costs milliseconds on CPU, but each model keeps
what makes its architecture distinct: dense layers before the MoE ones (DeepSeek
`first_k_dense_replace`, a Qwen2-MoE `mlp_only_layers` entry), shared experts, group-limited
routing and a non-zero score-correction bias (DeepSeek-V3), biased experts (GPT-OSS).
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 320  # 256 byte symbols + specials + a few merges of the tiny tokenizer
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # inside the vocab (OLMoE's default eos 50279 is not)

ARCHITECTURES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "gpt_oss"]

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

# per-architecture config keys (their names differ between families)
_SPECIFIC = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        mlp_only_layers=[1],  # a dense layer in the middle: moe_layers = [0, 2]
    ),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        # MLA attention needs as many key/value heads as query heads
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        head_dim=8,
    ),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=8,
        max_position_embeddings=131072,  # = its YaRN factor x original length: no mismatch warning
    ),
}


def tiny_config(arch: str):
    from transformers import AutoConfig

    if arch not in _SPECIFIC:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES}")
    return AutoConfig.for_model(arch, **{**_COMMON, **_SPECIFIC[arch]})


def tiny_moe_model(arch: str, seed: int = 0, **config_overrides):
    """A random-weight `*ForCausalLM` of architecture `arch` (a `model_type`), in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            # DeepSeek-V3 initialises the correction bias to zero; a random one makes group-limited,
            # bias-corrected routing differ visibly from a plain top-k of the router logits
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
    return model.eval()


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer whose ids fit `VOCAB_SIZE`, with pad/bos/eos at 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "experts route tokens", "hello world"] * 4
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}"
        )
    return fast
