"""A self-contained HTML report of a run: metrics, curves, heatmap overlays, per-slide table.

Every image is embedded (base64 PNG), so the file can be mailed or opened
offline. Reads what the stages wrote (model metadata, ``evaluation.json``,
heatmap overlays); computes nothing itself.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from pipeline.inference.results import read_manifest
from pipeline.outputs import write_atomic


def write_report(
    path: Path,
    *,
    title: str,
    summary_rows: list[tuple[str, str]],
    model_dir: Path | None,
    inference_dirs: list[Path],
    evaluation_dir: Path | None,
) -> Path:
    """Write ``path`` (HTML) from a model directory, inference folders and an evaluation."""
    from pipeline.evaluation.plots import plot_training

    path = Path(path)
    parts = [f"<h1>{_e(title)}</h1>", _table(["", ""], summary_rows, header=False)]
    if model_dir is not None and (model_dir / "wsiflow_model.json").is_file():
        metadata = json.loads((model_dir / "wsiflow_model.json").read_text())
        curves = path.with_name(f".{path.stem}-training.png")
        plot_training(curves, metadata["history"])
        parts += ["<h2>Training</h2>", _img(curves, "training curves")]
        curves.unlink()
        metrics = metadata["metrics"]
        parts.append(
            f"<p>{_e(metadata['backbone'])} on {metadata['patch_px']} px patches at "
            f"{metadata['patch_mpp']} µm/px; best validation AUC {metrics['val_auc']:.4f} "
            f"at epoch {metrics['best_epoch']} of {metrics['epochs_run']}.</p>"
        )
    evaluation: dict[str, Any] = {}
    if evaluation_dir is not None and (evaluation_dir / "evaluation.json").is_file():
        evaluation = json.loads((evaluation_dir / "evaluation.json").read_text())
        parts.append("<h2>CAMELYON16 evaluation</h2>")
        auc, froc = evaluation["slide_auc"], evaluation["froc"]
        parts.append(
            f"<p>Slide AUC <b>{'undefined' if auc is None else f'{auc:.4f}'}</b>; "
            f"FROC <b>{'undefined' if froc is None else f'{froc:.4f}'}</b> "
            f"({evaluation['lesions']} lesions, {evaluation['isolated_tumor_cells']} ITCs).</p>"
        )
        for reason in evaluation.get("undefined", {}).values():
            parts.append(f"<p><i>{_e(reason)}</i></p>")
        for name in ("roc", "froc"):
            png = evaluation["files"].get(name)
            if png and Path(png).is_file():
                parts.append(_img(Path(png), name))
        rows = [
            (
                r["slide"], "tumor" if r["tumor"] else "normal", f"{r['score']:.3f}",
                str(r["detections"]), str(r["lesions"]), str(r["lesions_found"]),
                str(r["itcs"]), str(r["false_positives"]),
            )
            for r in evaluation["per_slide"]
        ]  # fmt: skip
        parts.append(
            _table(
                ["slide", "reference", "score", "detections", "lesions", "found", "ITCs", "FPs"],
                rows,
            )
        )
    for folder in inference_dirs:
        manifest = read_manifest(folder)
        done = {
            k: v for k, v in manifest["slides"].items() if v.get("status") in ("done", "skipped")
        }
        if not done:
            continue
        parts.append(f"<h2>Heatmaps: {_e(str(folder))}</h2><div class='grid'>")
        for slide_id, record in sorted(done.items()):
            overlay = folder / "heatmaps" / f"{slide_id}_overlay.png"
            if overlay.is_file():
                score, found = record.get("score") or 0.0, record.get("detections", 0)
                caption = _e(f"{slide_id}: score {score:.3f}, {found} detection(s)")
                figure = f"<figure>{_photo(overlay, slide_id)}<figcaption>{caption}</figcaption>"
                parts.append(figure + "</figure>")
        parts.append("</div>")
    document = _PAGE.format(title=_e(title), body="\n".join(parts))
    write_atomic(path, document)
    return path


def _e(text: str) -> str:
    return html.escape(str(text))


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _photo(png: Path, alt: str, max_px: int = 640) -> str:
    """A slide picture as a JPEG of at most ``max_px`` (PNG overlays are megabytes each)."""
    from PIL import Image

    with Image.open(png) as image:
        image = image.convert("RGB")
        image.thumbnail((max_px, max_px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/jpeg;base64,{data}">'


def _table(columns: list[str], rows: list[tuple[str, ...]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
img {{ max-width: 100%; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 13px; }}
</style></head><body>
{body}
</body></html>
"""
