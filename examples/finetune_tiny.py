"""Fine-tune a tiny Llama with one adapter variant, save the adapter, load it into a fresh model, merge it.

    python examples/finetune_tiny.py                                # lora on q and v
    python examples/finetune_tiny.py --variant dora --roles q v down
    python examples/finetune_tiny.py --variant ia3 --roles k v
    python examples/finetune_tiny.py --variant eva                  # data-driven: calibrated on the training data

Run from the repository root with the package importable (`pip install -e .`, or `PYTHONPATH=.`). It takes
seconds on a CPU and downloads nothing: the model is built from a config with random weights, and the task is
a toy language (each sequence counts up from a random start by a random step, modulo the vocabulary).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers

import impl


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (hidden 64) with random weights; the same seed gives the same base model. The weights are
    drawn at scale 0.1 rather than transformers' 0.02, whose nearly flat logits a frozen lm_head cannot sharpen."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def counting_batches(n: int = 4, size: int = 8, length: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches of the toy language: start + step * t (mod 128), step in 1..3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 128, (size, 1), generator=g)
        step = torch.randint(1, 4, (size, 1), generator=g)
        ids = (start + step * torch.arange(length)) % 128
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="lora", choices=sorted(impl.VARIANTS))
    ap.add_argument("--roles", nargs="+", default=["q", "v"], help="roles to adapt: q k v o gate up down")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--out", type=Path, default=None, help="where to keep the adapter (default: a temporary folder)")
    args = ap.parse_args(argv)

    data = counting_batches()
    model = tiny_llama()
    cfg = impl.config(args.variant, r=args.r, alpha=2.0 * args.r, target_roles=tuple(args.roles))
    # data-driven variants (eva, antipasto_corda, ...) initialise from the inputs the targeted layers see
    calibration = data if impl.REGISTRY.get(args.variant).data != "none" else None
    impl.attach(model, cfg, calibration=calibration)
    trainable = [p for p in model.parameters() if p.requires_grad]  # only the adapter's tensors, in fp32
    print(f"{args.variant}: {len(impl.adapters(model))} adapted layers, {sum(p.numel() for p in trainable)} trainable parameters")

    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    model.train()
    for step in range(args.steps):
        b = data[step % len(data)]
        loss = model(**b, labels=b["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()

    probe = counting_batches(n=1, seed=1)[0]
    with torch.no_grad():
        y_trained = model(**probe).logits
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.out or Path(tmp)) / f"{args.variant}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        impl.save(model, path)  # adapter tensors, rewritten base weights, config, base-weight hashes
        fresh = impl.load(tiny_llama(), path)  # no calibration data: load never reruns an init
        with torch.no_grad():
            y_loaded = fresh(**probe).logits
        assert torch.equal(y_loaded, y_trained), "the loaded adapter does not reproduce the trained logits"
        print(f"saved {path.name} ({path.stat().st_size} bytes); loaded into a fresh model: identical logits")

    impl.merge(fresh)  # fold the adapter into the dense weights: a plain transformers model, no hooks
    with torch.no_grad():
        y_merged = fresh(**probe).logits
    err = (y_merged - y_trained).abs().max().item() / y_trained.abs().max().item()
    print(f"merged: max |logits - adapted logits| = {err:.1e} of max |logits|")
    assert err < 1e-4, "the merged model does not reproduce the adapted logits"
    if args.out is not None:
        fresh.save_pretrained(args.out / "merged")
        print(f"merged model written to {args.out / 'merged'}")


if __name__ == "__main__":
    main()
