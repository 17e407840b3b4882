"""Tiling: slides to a Zarr patch store.

- ``driver``: ``tile_slides`` (a cohort on Dask, through :mod:`pipeline.engine`),
  ``tile_slide`` (one slide inline, for the flows), ``summarize``.
- ``plan``: ``plan_slide`` (resolution, tissue, labels, which patches).
- ``grid``: patch geometry (``choose_resolution``, ``patch_grid``,
  ``select_patches``), shared with inference so that a model sees at
  inference the patches it was trained on.
- ``extract``: the worker side, ``extract_chunk`` of a ``Chunks`` task.
"""
