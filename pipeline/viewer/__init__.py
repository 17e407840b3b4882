"""The DeepZoom viewer: a Flask app over slide files and folders, and an inference folder.

``create_app(slides, heatmaps_dir)`` is the app factory (no module-level
slide). Routes::

    /                                             slides, thumbnails, heatmap or not
    /view/<slide_id>                              OpenSeadragon page, heatmap overlay
    /api/slides                                   JSON list of slides
    /api/slides/<slide_id>/detections             JSON detections of the heatmap's run
    /api/slides/<slide_id>/annotations            JSON ground truth outlines (--annotations)
    /api/slides/<slide_id>/regions                JSON predicted tumor outlines
    /api/slides/<slide_id>/review                 JSON evaluation: summary, outcomes, lesions
    /slides/<slide_id>.dzi                        Deep Zoom descriptor of the slide
    /slides/<slide_id>_files/<level>/<col>_<row>.jpeg
    /slides/<slide_id>/thumbnail.jpeg
    /slides/<slide_id>/associated/<name>.jpeg     label, macro, thumbnail...
    /heatmaps/<slide_id>.dzi                      same geometry as the slide's
    /heatmaps/<slide_id>_files/<level>/<col>_<row>.png

Anything not found, out of range or unreadable is 404, never 500.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, abort, jsonify, render_template
from PIL import Image

from pipeline.errors import WsiflowError
from pipeline.inference.heatmap import COLOR_MAPS, DEFAULT_COLOR_MAP, colorize, sample_level0
from pipeline.inference.results import EVALUATION, read_detections
from pipeline.slides.reader import READ_ERRORS
from pipeline.viewer.catalog import Catalog, Handle

#: Deep Zoom tile side and overlap (OpenSlide's example server uses the same).
TILE_PX = 254
OVERLAP = 1
#: What the slide list shows of a slide's evaluation record.
REVIEW_KEYS = ("tumor", "lesions", "lesions_found", "itcs", "false_positives")
#: Encoded tiles kept in memory (~20-60 kB each).
CACHE_TILES = 2048
JPEG_QUALITY = 80


def create_app(
    slides: Path | str | Sequence[Path | str],
    heatmaps_dir: Path | str | None = None,
    *,
    annotations_dir: Path | str | None = None,
    color_map: str = DEFAULT_COLOR_MAP,
    cache_tiles: int = CACHE_TILES,
) -> Flask:
    """The viewer app for ``slides`` (files, and folders searched recursively) and heatmaps.

    ``heatmaps_dir`` is an output folder of ``wsiflow infer`` (and of ``wsiflow
    evaluate``: its ``evaluation.json`` colours the detections);
    ``annotations_dir`` holds the slides' lesion annotations (ASAP XML or GeoJSON).
    Heatmap tiles are drawn in ``color_map`` (a key of ``COLOR_MAPS``), as the
    PNG overlays of ``wsiflow infer`` are with the same ``inference.color_map``.
    """
    if color_map not in COLOR_MAPS:
        raise ValueError(f"color_map must be one of {sorted(COLOR_MAPS)}. Received: {color_map!r}")
    app = Flask(__name__)
    sources = [slides] if isinstance(slides, str | Path) else list(slides)
    catalog = Catalog(
        [Path(s) for s in sources],
        None if heatmaps_dir is None else Path(heatmaps_dir),
        None if annotations_dir is None else Path(annotations_dir),
    )
    app.extensions["wsiflow_catalog"] = catalog
    cache = _TileCache(cache_tiles)

    @contextlib.contextmanager
    def reading(slide_id: str) -> Iterator[Handle]:
        """The slide's shared handle for this request; 404 if none.

        A read that fails (a corrupt tile) is 404, and the handle is retired:
        OpenSlide's error state sticks to it, and every later read of it would
        fail. The next request opens the slide anew. A level or tile address
        the slide does not have (Deep Zoom's ``ValueError``) is only a 404.
        """
        with catalog.borrow(slide_id) as handle:
            if handle is None:
                abort(404)
            try:
                yield handle
            except (WsiflowError, *READ_ERRORS):
                catalog.discard(slide_id, handle)
                abort(404)
            except ValueError:
                abort(404)

    def summaries() -> list[dict[str, Any]]:
        """Each slide's heatmap, score and evaluation outcome, highest score first."""
        rows = []
        for e in catalog.refresh():
            heatmap = None if e.error else catalog.heatmap(e.slide_id)
            record = catalog.review(e.slide_id) if heatmap is not None else None
            outcome = None
            if record and "stale" not in record:
                outcome = {k: record.get(k) for k in REVIEW_KEYS}
            rows.append(
                {
                    "entry": e,
                    "heatmap": heatmap is not None,
                    "score": None if heatmap is None else heatmap.attrs.get("score"),
                    "evaluation": outcome,
                }
            )
        return sorted(
            rows, key=lambda r: (r["score"] is None, -(r["score"] or 0), r["entry"].slide_id)
        )

    @app.get("/")
    def index():
        sources = ", ".join(str(given) for given, _ in catalog.sources)
        return render_template("index.html", rows=summaries(), sources=sources)

    @app.get("/view/<slide_id>")
    def view(slide_id: str):
        entry = catalog.entry(slide_id) or abort(404)
        heatmap = catalog.heatmap(slide_id)
        return render_template(
            "slide.html",
            entry=entry,
            has_heatmap=heatmap is not None,
            heatmap_attrs=None if heatmap is None else heatmap.attrs,
            legend=_legend_stops(color_map),
            color_map=color_map,
            has_annotations=catalog.annotations_dir is not None,
        )

    @app.get("/api/slides")
    def api_slides():
        return jsonify(
            [
                {
                    "id": r["entry"].slide_id,
                    "path": r["entry"].relative,
                    "readable": r["entry"].error is None,
                    "error": r["entry"].error,
                    "heatmap": r["heatmap"],
                    "score": r["score"],
                    "evaluation": r["evaluation"],
                    **r["entry"].info,
                }
                for r in summaries()
            ]
        )

    @app.get("/api/slides/<slide_id>/detections")
    def api_detections(slide_id: str):
        catalog.entry(slide_id) or abort(404)
        path = catalog.detections_path(slide_id)
        if path is None:
            return jsonify([])
        try:
            confidences, level0_xy = read_detections(path)
        except WsiflowError:
            abort(404)
        return jsonify(
            [
                {"confidence": float(c), "x": int(x), "y": int(y)}
                for c, (x, y) in zip(confidences, level0_xy, strict=True)
            ]
        )

    @app.get("/api/slides/<slide_id>/annotations")
    def api_annotations(slide_id: str):
        catalog.entry(slide_id) or abort(404)
        found = catalog.annotations(slide_id)
        return jsonify(found) if found is not None else abort(404)

    @app.get("/api/slides/<slide_id>/regions")
    def api_regions(slide_id: str):
        catalog.entry(slide_id) or abort(404)
        return jsonify(catalog.regions(slide_id))

    @app.get("/api/slides/<slide_id>/review")
    def api_review(slide_id: str):
        catalog.entry(slide_id) or abort(404)
        record = catalog.review(slide_id)
        if not record or "stale" in record:
            return jsonify(record or {})
        if "review" not in record:  # written by an earlier wsiflow
            return jsonify({"stale": f"{EVALUATION} has no outcomes: evaluate again"})
        return jsonify(
            {
                "summary": {k: record.get(k) for k in REVIEW_KEYS},
                "detections": record["review"]["detections"],
                "lesions": record["review"]["lesions"],
            }
        )

    @app.get("/slides/<slide_id>.dzi")
    def slide_dzi(slide_id: str):
        with reading(slide_id) as handle:
            dzi = handle.deepzoom(TILE_PX, OVERLAP).get_dzi("jpeg")
        return Response(dzi, mimetype="application/xml")

    @app.get("/slides/<slide_id>_files/<int:level>/<int:col>_<int:row>.jpeg")
    def slide_tile(slide_id: str, level: int, col: int, row: int):
        with reading(slide_id) as handle:
            key = ("slide", slide_id, handle.stamp, level, col, row)  # a changed file: new tiles
            data = cache.get(key)
            if data is None:
                tile = handle.deepzoom(TILE_PX, OVERLAP).get_tile(level, (col, row))
                data = _encode(tile, "JPEG")
                cache.put(key, data)
        return Response(data, mimetype="image/jpeg")

    @app.get("/slides/<slide_id>/thumbnail.jpeg")
    def slide_thumbnail(slide_id: str):
        with reading(slide_id) as handle:
            key = ("thumb", slide_id, handle.stamp)
            data = cache.get(key)
            if data is None:
                data = _encode(Image.fromarray(handle.reader.thumbnail((256, 256))), "JPEG")
                cache.put(key, data)
        return Response(data, mimetype="image/jpeg")

    @app.get("/slides/<slide_id>/associated/<name>.jpeg")
    def associated(slide_id: str, name: str):
        with reading(slide_id) as handle:
            if name not in handle.reader.info.associated_images:
                abort(404)
            image = handle.reader.associated_image(name)
        return Response(_encode(Image.fromarray(image), "JPEG"), mimetype="image/jpeg")

    @app.get("/heatmaps/<slide_id>.dzi")
    def heatmap_dzi(slide_id: str):
        catalog.heatmap(slide_id) or abort(404)
        with reading(slide_id) as handle:
            dzi = handle.deepzoom(TILE_PX, OVERLAP).get_dzi("png")
        return Response(dzi, mimetype="application/xml")

    @app.get("/heatmaps/<slide_id>_files/<int:level>/<int:col>_<int:row>.png")
    def heatmap_tile(slide_id: str, level: int, col: int, row: int):
        heatmap = catalog.heatmap(slide_id) or abort(404)
        key = ("heatmap", slide_id, heatmap.stamp, level, col, row)
        data = cache.get(key)
        if data is None:
            with reading(slide_id) as handle:
                dz = handle.deepzoom(TILE_PX, OVERLAP)
                (l0x, l0y), slide_level, (level_w, level_h) = dz.get_tile_coordinates(
                    level, (col, row)
                )
                out_w, out_h = dz.get_tile_dimensions(level, (col, row))
                downsample = handle.reader.info.level_downsamples[slide_level]
            box = (l0x, l0y, l0x + level_w * downsample, l0y + level_h * downsample)
            values = sample_level0(heatmap.probability, heatmap.level0_cell_px, box, (out_w, out_h))
            data = _encode(Image.fromarray(colorize(values, color_map), mode="RGBA"), "PNG")
            cache.put(key, data)
        return Response(data, mimetype="image/png")

    @app.errorhandler(404)
    def not_found(error):
        return Response("not found\n", status=404, mimetype="text/plain")

    return app


def log_requests(wsgi_app):
    """Wrap a WSGI app to print one line per request on stderr (``serve --verbose``)."""
    import sys

    def logged(environ, start_response):
        def start(status, headers, exc_info=None):
            path = environ.get("PATH_INFO", "")
            print(f"{environ.get('REQUEST_METHOD')} {path} {status}", file=sys.stderr, flush=True)
            return start_response(status, headers, exc_info)

        return wsgi_app(environ, start)

    return logged


class _TileCache:
    """A thread-safe LRU of encoded tiles."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple, data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.limit:
                self._items.popitem(last=False)


def _encode(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    if format == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _legend_stops(color_map: str) -> list[tuple[float, str]]:
    """CSS gradient stops of the heatmap colours with their transparency."""
    values = np.linspace(0, 1, 21, dtype=np.float32)
    values[0] = 1e-3  # 0 means "no patch" (clear); the legend shows the lowest prediction
    rgba = colorize(values[None, :], color_map)[0]
    return [
        (float(v), f"rgba({r}, {g}, {b}, {a / 255:.2f})")
        for v, (r, g, b, a) in zip(values, rgba.tolist(), strict=True)
    ]
