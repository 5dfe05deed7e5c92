"""Attention modules with the public names of ``reformer_pytorch``.

* :class:`LSHAttention` - LSH attention on already-projected ``qk``, ``v`` (heads folded
  into the batch); returns ``(out, attn, buckets)``.
* :class:`FullQKAttention` - dense shared-QK attention with the same masks.
* :class:`LSHSelfAttention` - the full layer on ``(batch, len, dim)``: projections, heads,
  learned memory key/values, extra ``keys=``, local heads, full attention for short inputs.
* :class:`LSHOptions` - every LSH option in one frozen object (``LSHOptions.from_config``).
"""

from .lsh import FullQKAttention, LSHAttention
from .options import LSHOptions
from .self_attention import LSHSelfAttention

__all__ = ["LSHAttention", "FullQKAttention", "LSHSelfAttention", "LSHOptions"]
