"""Lookahead memory indexer, heuristic baselines, labels, records, training and chunk index backends.

Takes tensors and model fingerprints, never a model: what runs a model to build records or train
end to end is :mod:`flashmem.indexer_data` / :mod:`flashmem.indexer_training`. The fitting loop
(:mod:`flashmem.indexer.train`) is not imported here, so the inference path never loads training
code."""

from .chunk_index import ChunkIndex, FaissChunkIndex, TorchChunkIndex, fold_query_for_heads, make_chunk_index
from .evaluate import evaluate_records, refresh_cost, selection_metrics
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
from .lookahead import (
    CHECKPOINT_FORMAT,
    LayerIndexer,
    LookaheadConfig,
    LookaheadIndexer,
    default_checkpoint_path,
    select_chunks,
)
from .records import DocRecord, TargetConfig, load_records, save_records
from .summaries import ChunkSummaries, ChunkSummaryBuilder, summarize_chunks
from .synthetic import local_documents, local_text_files, synthetic_documents

__all__ = [
    "CHECKPOINT_FORMAT",
    "HEURISTICS",
    "DocRecord",
    "TargetConfig",
    "default_checkpoint_path",
    "evaluate_records",
    "load_records",
    "local_documents",
    "local_text_files",
    "refresh_cost",
    "save_records",
    "selection_metrics",
    "synthetic_documents",
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
