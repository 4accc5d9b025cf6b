"""qsurgeon server: model adapters, scores, QUBO builders, the iCBS engine and the REST API."""
