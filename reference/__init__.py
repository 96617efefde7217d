"""Naive, obviously-correct torch versions of IGNN's graph aggregation: the oracle."""
from .graph import (aggregate, edge_features, fold_edges, fold_hr, graph_aggregation,
                    key_blocks, key_stats, patch_knn, query_stats, weighted_sum, window_mask)

__all__ = ["aggregate", "edge_features", "fold_edges", "fold_hr", "graph_aggregation",
           "key_blocks", "key_stats", "patch_knn", "query_stats", "weighted_sum", "window_mask"]
