"""Tiny transformers models built from a config (no downloads) and calibration batches made in code."""
from __future__ import annotations

import torch

ARCHS = ("llama", "qwen", "gpt2")


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64):
    """A 2-layer model of the given architecture family with random weights."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128, num_hidden_layers=2, attn_implementation="eager")
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                            attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def batch(seed: int = 0, b: int = 2, t: int = 10, pad: int = 3) -> dict[str, torch.Tensor]:
    """Token ids with right padding on the second row, and its attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if pad:
        mask[-1, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def calibration(n: int = 3, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    """Calibration batches with padding. Token ids drawn from a skewed distribution (a few frequent tokens)
    make the activations anisotropic."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.full((128,), 0.2)
    probs[:6] = 20.0
    out = []
    for i in range(n):
        ids = torch.multinomial(probs, 2 * 12, replacement=True, generator=g).view(2, 12)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, -4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
