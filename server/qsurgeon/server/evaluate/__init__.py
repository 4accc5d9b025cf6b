"""Measuring a pruned model against its dense original: embeddings, perplexity, classification."""
