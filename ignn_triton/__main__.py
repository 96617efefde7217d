"""`python -m ignn_triton ...`: the same as the `ignn-triton` command."""
import sys

from .cli import main

sys.exit(main())
