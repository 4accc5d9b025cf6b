"""Per-layer pruning maths: sparsity constraints, scores and one-shot masks, block QUBOs, SparseGPT, the refit."""
