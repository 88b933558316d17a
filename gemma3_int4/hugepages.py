"""Imported by the scripts before torch: PyTorch's CPU allocator backs its large tensors with 2 MB pages.

Without this, on Linux machines whose transparent huge pages are "madvise" (a common default), every large
tensor arrives in 4 KB pages, each a page fault when first touched: a prefill's activations and dequantized
weight tiles, a load's repacked weights. PyTorch reads THP_MEM_ALLOC_ENABLE once, at its first allocation, so
it must be set before torch is imported (a Python user of model.py can export it in the shell instead).
bench/speed.py measures what it is worth.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
