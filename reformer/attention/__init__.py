"""Attention modules with the public names of ``reformer_pytorch``.

* :class:`LSHAttention` - LSH attention on already-projected ``qk``, ``v`` (heads folded
  into the batch); returns ``(out, attn, buckets)``.
* :class:`FullQKAttention` - dense shared-QK attention with the same masks.
* :class:`LSHSelfAttention` - the full layer on ``(batch, len, dim)``: projections, heads,
  learned memory key/values, extra ``keys=``, local heads, full attention for short inputs.
"""

from .lsh import FullQKAttention, LSHAttention
from .self_attention import LSHSelfAttention

__all__ = ["LSHAttention", "FullQKAttention", "LSHSelfAttention"]
