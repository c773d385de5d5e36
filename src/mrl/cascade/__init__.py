"""Adaptive classification over the prefixes of a Matryoshka classifier (a cascade).

* `mrl.cascade.core`: `Cascade` (thresholds, predict, save/load), `fit_cascade`, `oracle`, costs.
* `mrl.cascade.evaluate`: calibration/test splits, accuracy-vs-expected-dims curves, records and
  the "N x smaller at the same accuracy" headline beside fixed-feature models.
* `mrl.cascade.report`: plot and markdown for a cascade evaluation.
* `mrl.cascade.demo`: `demo_section(ctx)` for `mrl demo`.
"""

from mrl.cascade.core import Cascade, cascade_costs, confidence, fit_cascade, oracle
from mrl.cascade.evaluate import cascade_curve, evaluate_cascade, split_calibration, summarize

__all__ = [
    "Cascade",
    "cascade_costs",
    "cascade_curve",
    "confidence",
    "demo_section",
    "evaluate_cascade",
    "fit_cascade",
    "oracle",
    "split_calibration",
    "summarize",
]


def demo_section(ctx):  # noqa: ANN001 - duck-typed context, see mrl.cascade.demo
    """Markdown and records for the demo report; see `mrl.cascade.demo.demo_section`."""
    from mrl.cascade.demo import demo_section as _demo_section

    return _demo_section(ctx)
