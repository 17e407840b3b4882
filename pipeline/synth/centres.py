"""The two scanning centres of CAMELYON16, as stain and scanner profiles.

CAMELYON16's slides come from Radboud UMC (Pannoramic 250, 0.243 µm/px) and
UMC Utrecht (NanoZoomer-XR, 0.226 µm/px), stained in different labs: the
colour, resolution, compression and sharpness all shift between them, and a
model trained on one centre loses accuracy on the other. The optical-density
vectors here are Macenko estimates from two real H&E slides (the tests check
the synthetic slides against them, ``tests/pipeline/synth/test_hard.py``):
Radboud's from OpenSlide's CMU-1 Aperio slide (violet nuclei, pink stroma),
Utrecht's from a TCGA section (magenta, weakly separated stains).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Centre:
    """A lab and scanner: stain vectors and strengths, resolution, JPEG quality, optics."""

    name: str
    mpp: float
    jpeg_quality: int
    h_od: tuple[float, float, float]
    e_od: tuple[float, float, float]
    h_scale: float
    e_scale: float
    light_rgb: tuple[float, float, float]
    blur_um: float  # about the Gaussian sigma of the optics; 0: as sharp as the pixel grid


CENTRES = {
    "radboud": Centre(
        name="radboud",
        mpp=0.243,
        jpeg_quality=80,
        h_od=(0.809, 0.510, 0.293),
        e_od=(0.173, 0.906, 0.387),
        h_scale=1.0,
        e_scale=1.0,
        light_rgb=(243.0, 241.0, 244.0),
        blur_um=0.0,
    ),
    "utrecht": Centre(
        name="utrecht",
        mpp=0.226,
        jpeg_quality=70,
        h_od=(0.374, 0.761, 0.529),
        e_od=(0.153, 0.878, 0.453),
        h_scale=1.15,
        e_scale=0.85,
        light_rgb=(236.0, 233.0, 240.0),
        blur_um=0.25,
    ),
}
