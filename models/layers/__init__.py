"""Layers several model families can share: attention backends with document masking, RMSNorm, RoPE and the
chunked LM loss. A family's own modules (PolyGLU's FFN, the MoE router) live in its folder."""
