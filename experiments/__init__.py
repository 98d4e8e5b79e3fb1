"""Experiments: each script has a ``main(argv)`` entry point, writes tables (markdown + CSV) and figures (PNG) to
``--out`` (default ``experiments/out/<script>/``), and in ``--quick`` mode asserts its key conclusions (CI).

Run one as ``python -m experiments.heat_kernel [--quick] [--out DIR]``.
"""
