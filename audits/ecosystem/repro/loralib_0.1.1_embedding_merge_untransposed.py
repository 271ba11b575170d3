"""loralib 0.1.1: lora.Embedding.eval() merges B@A without the transpose (fixed in 0.1.2).

    pip install torch loralib==0.1.1 && python loralib_0.1.1_embedding_merge_untransposed.py

lora.Embedding holds lora_A (r, num_embeddings) and lora_B (embedding_dim, r); its forward adds
embedding(ids, lora_A.T) @ lora_B.T, i.e. the delta (B@A).T on the (num_embeddings, embedding_dim) weight. Its
eval() in 0.1.1 adds (self.lora_B @ self.lora_A) * self.scaling without .T (loralib/layers.py:75): a RuntimeError
when num_embeddings != embedding_dim, and, when they are equal, an eval output that silently differs from the
train-mode one. Exits 1 while the bug is present.
"""
import sys

import loralib as lora
import torch

torch.manual_seed(0)
failed = False
for V, D in ((6, 4), (5, 5)):
    emb = lora.Embedding(V, D, r=2, lora_alpha=4)
    with torch.no_grad():
        emb.lora_A.normal_()  # a trained adapter (lora_A starts at zero)
    ids = torch.tensor([[0, 3, 1]])
    emb.train()
    with torch.no_grad():
        y_train = emb(ids)
    try:
        emb.eval()  # merges (merge_weights=True)
        with torch.no_grad():
            y_eval = emb(ids)
        diff = (y_eval - y_train).abs().max().item()
        print(f"Embedding({V}, {D}): max |eval output - train output| = {diff:.3g}")
        failed |= diff > 1e-5
    except RuntimeError as e:
        print(f"Embedding({V}, {D}): eval() raises RuntimeError: {e}")
        failed = True
if failed:
    print("BUG: lora.Embedding's merge on eval() does not add the delta its forward applies")
    sys.exit(1)
print("ok: eval output equals train output")
