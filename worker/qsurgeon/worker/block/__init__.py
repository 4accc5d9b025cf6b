"""The block contract: a cardinality-constrained QUBO (BlockProblem), its answer (BlockSolution), and their codec."""
