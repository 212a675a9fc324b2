"""Throughput benchmarks (not tests): ``python -m benchmarks --help``; see docs/performance.md.

Modules, by concern (the library's layout, for the benchmarks):

- ``run``: the command line; runs the families below and writes the report (``FAMILIES``).
- ``sizes``: the full, full-CUDA and quick sizes and shared constants.
- ``timing``: timed runs (median, spread, page faults, CPU time) and the result row (``rate``).
- ``synthetic``: COCO-like captions and batches, JPEGs and Karpathy JSONs.
- ``models``: ours and the tutorial reference built alike, and our training step.
- ``isolation``: rows measured in a fresh interpreter each.
- ``tutorial_reference``: our re-implementation of the tutorial's hot paths.
- ``equivalence``: the check that the reference and ours compute the same things.
- one module per family: ``preprocess``, ``loader``, ``train`` (+ ``lightning_loop``),
  ``decode``, ``evaluate_loop``, ``scst``, ``serving``.
- ``report``: the ratios to the tutorial and to the targets (``TARGETS``), and the table.
- ``calls``: ATen calls per training step (``python -m benchmarks.calls``).

Adding a family: write ``benchmarks/<topic>.py`` with a function that takes the run's
``Context`` (sizes, device, repeats, loader workers, prepared data) and returns result rows
built with ``benchmarks.timing.rate`` (name, group, impl, unit, value, spread); register it with
one line in ``benchmarks.run.FAMILIES`` (its key is its ``--only`` name); add its ratios to
``benchmarks.report.TARGETS`` as ``(label, (name, impl), (name, impl), target)``.
"""
