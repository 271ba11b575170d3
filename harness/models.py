"""The models every check builds: a one-layer model around a base layer of a given layout, tiny transformers
models built from a config (no downloads), and calibration batches made in code."""
from __future__ import annotations

import torch
from torch import nn

ARCHS = ("llama", "qwen", "gpt2")


def tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 64, vocab: int = 128):
    """A 2-layer model of the given architecture family (llama, qwen, gpt2) with random weights, built from a
    config (nothing downloaded), in eval mode. GPT-2's projections are transformers' transposed Conv1D."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, num_hidden_layers=2, attn_implementation="eager")
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen":
        cfg = tf.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, vocab_size=vocab,
                            attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
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


class Single(nn.Module):
    """A one-layer model: the unit every property adapts. Extra keyword inputs (attention_mask, labels) are ignored."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, attention_mask=None, labels=None):
        return self.layer(x)


def make_layer(W: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, layout: str = "linear",
               device: str = "cpu") -> nn.Module:
    """A base layer holding (W, b): layout linear | conv1d (transformers' transposed storage) | bnb4 | bnb8."""
    d_out, d_in = W.shape
    if layout == "linear":
        m = nn.Linear(d_in, d_out, bias=b is not None)
        m.weight.data = W.to(dtype).clone()
    elif layout == "conv1d":
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(d_out, d_in)
        m.weight.data = W.t().to(dtype).contiguous().clone()
        if b is None:
            b = torch.zeros(d_out, dtype=torch.float64)  # Conv1D always has a bias
    elif layout in ("bnb4", "bnb8"):
        import bitsandbytes as bnb

        if layout == "bnb4":
            m = bnb.nn.Linear4bit(d_in, d_out, bias=b is not None, compute_dtype=torch.float32, quant_type="nf4")
            m.weight = bnb.nn.Params4bit(W.float().clone(), requires_grad=False, quant_type="nf4")
        else:
            m = bnb.nn.Linear8bitLt(d_in, d_out, bias=b is not None, has_fp16_weights=False)
            m.weight = bnb.nn.Int8Params(W.float().clone(), requires_grad=False, has_fp16_weights=False)
        if b is not None:
            m.bias = nn.Parameter(b.float().clone(), requires_grad=False)
        m = m.to("cpu")
        return m
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if b is not None:
        m.bias.data = b.to(dtype).clone()
    return m.to(device)


def single(W, b, dtype, layout="linear", device="cpu") -> Single:
    return Single(make_layer(W, b, dtype, layout, device))
