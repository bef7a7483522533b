"""The devices the op tests run on: every op test that takes a ``device`` is parametrised
over :data:`DEVICES` (``@pytest.mark.parametrize("device", DEVICES)``), so a GPU machine runs
each one on CUDA too, with the same assertions; test ids name the device (``[cpu]``,
``[cuda]``), so ``pytest -k cuda`` selects the CUDA cases. What only the GPU has (graph
capture, sync-free calls, the descriptor-table cache, grid sizes, streams, tensors over 2**31
elements, ``cuda_fast_path``) is tested in ``tests/test_cuda.py``.

Example:
    >>> DEVICES[0]
    'cpu'
"""

from __future__ import annotations

import torch

#: "cpu", and "cuda" when a CUDA device is visible.
DEVICES: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
