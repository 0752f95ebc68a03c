"""Tiny random transformers models (hidden 32, 2 layers, vocabulary 99) of the architectures whose
targets and export the tests check, and the names of their default targets written out."""

from __future__ import annotations

import torch

VOCAB = 99
ENCODERS = ("bert", "roberta")
DECODERS = ("llama", "qwen2", "mistral", "gemma", "opt", "gpt2")
ARCHITECTURES = ENCODERS + DECODERS

_LLAMA_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BERT_LIKE = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")
# (the repeated blocks, the prunable layers of one block in the model's order)
BLOCKS = {
    "bert": ("bert.encoder.layer", _BERT_LIKE),
    "roberta": ("roberta.encoder.layer", _BERT_LIKE),
    "llama": ("model.layers", _LLAMA_LIKE),
    "qwen2": ("model.layers", _LLAMA_LIKE),
    "mistral": ("model.layers", _LLAMA_LIKE),
    "gemma": ("model.layers", _LLAMA_LIKE),
    "opt": ("model.decoder.layers", ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                     "self_attn.out_proj", "fc1", "fc2")),
    "gpt2": ("transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}


def expected_targets(arch: str, layers: int = 2) -> list[str]:
    stack, names = BLOCKS[arch]
    return [f"{stack}.{i}.{n}" for i in range(layers) for n in names]


def tiny_config(arch: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    llama_like = dict(common, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "bert":
        return T.BertConfig(**common, num_labels=2)
    if arch == "roberta":
        return T.RobertaConfig(**common, num_labels=2)
    if arch in ("llama", "qwen2", "mistral"):
        return {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[arch](**llama_like)
    if arch == "gemma":
        return T.GemmaConfig(**llama_like, head_dim=16)
    if arch == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                           max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    if arch == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                            eos_token_id=2, pad_token_id=0)
    raise ValueError(f"unknown architecture {arch!r}")


def tiny_model(arch: str, seed: int = 0):
    """A random model of `arch` with its head: sequence classification for the encoders, causal LM for
    the decoders; in eval mode."""
    import transformers as T

    config = tiny_config(arch)
    torch.manual_seed(seed)
    if arch in ENCODERS:
        return T.AutoModelForSequenceClassification.from_config(config).eval()
    return T.AutoModelForCausalLM.from_config(config).eval()
