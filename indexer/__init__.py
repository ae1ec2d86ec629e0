"""Lookahead memory indexer, heuristic baselines, labels, training and chunk index backends."""
