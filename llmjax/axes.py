"""Logical axis names and the one table that maps them onto mesh axes.

Every parameter is created with logical names (``nn.with_logical_partitioning``);
activations are constrained with the ``act_*`` names. Changing how a model is
sharded means changing this table, nothing else.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "tensor")

# Parameter axes.
EMBED = "embed"            # model width of weights: sharded over fsdp
MLP = "mlp"                # feed-forward hidden width: tensor parallel
HEADS = "heads"            # joined (num_heads * head_dim) projection width
KV_HEADS = "kv_heads"      # joined (num_kv_heads * head_dim) projection width
VOCAB = "vocab"            # vocabulary rows / logits columns
NORM = "norm"              # RMSNorm scales: replicated
RELPOS = "relpos_buckets"  # T5 relative-position buckets: replicated
LAYERS = "layers"          # leading axis of scanned layer stacks: every device holds every layer

# Activation axes.
ACT_BATCH = "act_batch"
ACT_LENGTH = "act_length"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"

# (logical name, mesh axis or tuple of mesh axes or None). First match wins.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (EMBED, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (VOCAB, "tensor"),
    (NORM, None),
    (RELPOS, None),
    (LAYERS, None),
    (ACT_BATCH, ("data", "fsdp")),
    (ACT_LENGTH, None),
    (ACT_EMBED, None),
    (ACT_HEADS, "tensor"),
    (ACT_MLP, "tensor"),
    (ACT_VOCAB, "tensor"),
)
