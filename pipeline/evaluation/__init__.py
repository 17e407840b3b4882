"""Evaluation: CAMELYON16 slide AUC and lesion FROC, plots and the run report.

- ``evaluate``: ``evaluate`` an inference output folder against a reference.
- ``froc``: the organisers' lesion FROC (``compute_froc``) and ``roc``.
- ``reference``: ``read_reference`` (``reference.csv``).
- ``plots``: ROC, FROC and training-curve PNGs.
- ``report``: ``write_report``, the demo's self-contained HTML page.
"""
