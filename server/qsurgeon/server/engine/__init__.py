"""The pruning engine: options in, pruned model out (run, methods, the iCBS search, checkpoints, reports, outputs)."""
