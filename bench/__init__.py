"""capsa-serve's benchmarks, one entry point: ``python -m bench serve [--quick] [--peers] [--cnn] [--out DIR]``
(serving, :mod:`bench.serve`) and ``python -m bench overhead [...]`` (capsa's cost of risk,
``bench/capsa_overhead.py``). Not part of the installed package; run from the repository root."""
