"""A minimal tour until the training command lands: one LSH self-attention layer, forward and
backward, and a check that causal outputs ignore the future."""

import time

import torch

from reformer import LSHSelfAttention

torch.manual_seed(0)
layer = LSHSelfAttention(dim=256, heads=4, bucket_size=64, n_hashes=4, causal=True, max_seq_len=4096)
x = torch.randn(1, 4096, 256, requires_grad=True)

start = time.perf_counter()
y = layer(x)
y.square().mean().backward()
print(f"LSHSelfAttention: {tuple(x.shape)} -> {tuple(y.shape)}, fwd+bwd {time.perf_counter() - start:.2f}s")

layer.eval()
with torch.no_grad():
    base = layer(x)
    future = x.detach().clone()
    future[:, 2048:] = torch.randn_like(future[:, 2048:])
    change = (layer(future)[:, :2048] - base[:, :2048]).abs().max().item()
print(f"strict causality: changing tokens 2048.. moves outputs 0..2047 by {change:.1e}")
