"""gradstab's test helpers, a package of ``tests/`` (pytest puts ``tests/`` on ``sys.path``:
``pythonpath`` in pyproject.toml; child processes get it from ``oracles.child_env``).

- :mod:`gradstab_testing.oracles`: random gradients (Hypothesis strategies), float64 oracles,
  ulp and bitwise comparisons, ``child_env``.
- :mod:`gradstab_testing.devices`: ``DEVICES``, the devices every op test runs on.
- :mod:`gradstab_testing.kernel_cases`: the case tables and oracles of the CUDA kernels' tests,
  shared by the device-parametrised op tests, ``test_cuda.py`` and ``test_cuda_sim.py``.
- :mod:`gradstab_testing.cuda_sim_harness`: builds and calls the CPU execution harness of the
  CUDA kernels (csrc/testing/cuda_sim).
- :mod:`gradstab_testing.distributed`: the 2-process scenarios and Lightning DDP runs of the
  distributed tests (``python -m gradstab_testing.distributed lightning KIND OUT_DIR``).
"""
