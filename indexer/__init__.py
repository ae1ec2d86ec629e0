"""Lookahead memory indexer, heuristic baselines, labels, training and chunk index backends."""

from .chunk_index import ChunkIndex, FaissChunkIndex, TorchChunkIndex, fold_query_for_heads, make_chunk_index
from .heuristics import (
    HEURISTICS,
    Indexer,
    MeanKeyIndexer,
    OracleIndexer,
    QueryState,
    QuestIndexer,
    RecencyIndexer,
    get_indexer,
    register_indexer,
)
from .lookahead import LayerIndexer, LookaheadConfig, LookaheadIndexer, select_chunks
from .summaries import ChunkSummaries, ChunkSummaryBuilder, summarize_chunks

__all__ = [
    "HEURISTICS",
    "ChunkIndex",
    "ChunkSummaries",
    "ChunkSummaryBuilder",
    "FaissChunkIndex",
    "Indexer",
    "LayerIndexer",
    "LookaheadConfig",
    "LookaheadIndexer",
    "MeanKeyIndexer",
    "OracleIndexer",
    "QueryState",
    "QuestIndexer",
    "RecencyIndexer",
    "TorchChunkIndex",
    "fold_query_for_heads",
    "get_indexer",
    "make_chunk_index",
    "register_indexer",
    "select_chunks",
    "summarize_chunks",
]
