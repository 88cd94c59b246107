"""Benchmarks of the provider against the emulator and an S3 server on loopback: ``make bench``.

Layout: :mod:`bench.services` runs the emulator and the S3 server in child processes,
:mod:`bench.worker` runs one measured workload (the operator or the naive baseline) in a fresh child
process, :mod:`bench.scenarios` defines P1-P4 and the scaling sweep, :mod:`bench.report` writes
the table, ``bench/results/latest.json``, ``docs/benchmarks.md`` and the scaling plot.
"""
