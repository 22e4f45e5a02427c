"""The network pieces a forward runs through: every attention mask, the rows' logical predecessors for layers
that read their neighbours, and the inference fast paths (fused projections, packed grouped-query attention)."""
