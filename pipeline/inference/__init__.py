"""Inference: whole slides to heatmaps, detections and slide scores.

- ``driver``: ``infer_slides`` (a cohort on Dask, through :mod:`pipeline.engine`),
  ``infer_slide`` (one slide inline, for the flows), ``summarize``.
- ``predict``: the worker side, ``plan_inference`` and ``predict_block`` of a
  ``Block`` task. It is the one place where ``pipeline`` loads a model: it
  imports :mod:`models` (``models.predict``, ``models.saved``) inside its
  functions, so ``models`` may build on ``pipeline`` without a cycle at import.
- ``heatmap``: stitching (``HeatmapAccumulator``), ``detect_lesions``,
  ``slide_score``, heatmap images.
- ``results``: the output folder (heatmaps, detections, ``scores.csv``,
  ``inference.json``) and its readers.
"""
