"""Static resources of every Triton kernel config, compiled ahead of time without a GPU.

    python profiling/resources.py [--arch 80 90]

For each kernel's default configs (every dtype), compiled for sm_80 and sm_90: registers,
stack, spill bytes, shared memory, and whether the PTX uses mma.sync / wgmma. The same
compilation runs in CI as tests/test_aot.py.
"""
from __future__ import annotations

import argparse
import sys

from ignn_triton.kernels import KERNEL_MODULES, aot


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    args = parser.parse_args(argv)
    reports = [r for module in KERNEL_MODULES for r in aot.compile_specs(module, args.arch)]
    print(aot.format_table(reports))
    return 1 if any(r.spills for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
