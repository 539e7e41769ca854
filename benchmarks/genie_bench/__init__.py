"""genie-tk's benchmark suite: kernels of the four triangle ops, side by side with the peers.

Run ``python -m genie_bench --help`` (from ``benchmarks/``, or with it on
``PYTHONPATH``); ``benchmarks/README.md`` documents the result format.

Modules: :mod:`cases` (ops, inputs, FLOP counts), :mod:`methods` (backends and
peers), :mod:`timing`, :mod:`memory`, :mod:`errors` (fp64 oracle), :mod:`floors`,
:mod:`env`, :mod:`kernels` (the kernel suite), :mod:`schema`, :mod:`report`
(markdown and plots), :mod:`readme` (the README's performance section).
"""

SCHEMA = "genie-bench/1"
