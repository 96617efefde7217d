"""Fused Triton kernels of ignn_triton (importable as ignn_triton.kernels).

Importing this package never fails: without triton, HAS_TRITON is False and the launchers are
absent (ignn_triton.ops then runs its torch path). Kernels run on CUDA tensors, or on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported);
every launcher runs under its tensors' device and checks its grids and sizes (utils.py).
"""
# Modules with Triton kernels; each exports aot_specs() (name, jit function, signature,
# constexprs, launch options) for its default configs, recorded from its own launchers: see
# kernels/aot.py, tests/test_aot.py.
KERNEL_MODULES = ("ignn_triton.kernels.patch_knn", "ignn_triton.kernels.patch_stats",
                  "ignn_triton.kernels.patch_aggregate")

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception:  # ImportError, or a triton without a usable backend
    HAS_TRITON = False
else:
    HAS_TRITON = True

if HAS_TRITON:
    from .patch_knn import EdgeConfig, KnnConfig, edge_features, patch_knn  # noqa: F401
    from .patch_stats import (StatsConfig, key_grid_args, patch_stats,  # noqa: F401
                              patch_stats_backward, query_grid_args)
    from .patch_aggregate import (AggregateConfig, patch_aggregate,  # noqa: F401
                                  patch_aggregate_backward)

__all__ = ["HAS_TRITON", "KERNEL_MODULES"]
if HAS_TRITON:
    __all__ += ["patch_knn", "edge_features", "KnnConfig", "EdgeConfig", "patch_stats",
                "patch_stats_backward", "query_grid_args", "key_grid_args", "StatsConfig",
                "patch_aggregate", "patch_aggregate_backward", "AggregateConfig"]
