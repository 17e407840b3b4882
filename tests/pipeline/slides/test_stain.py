"""Stain normalisation: a slide's stains mapped onto the target's, on images of known stains."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.slides.stain import (
    CONCENTRATION_PERCENTILE,
    MIN_STAIN_ANGLE_DEG,
    OD_TISSUE,
    angle_deg,
    fit_stain,
    ink_pixels,
    normalize,
    optical_density,
    stained_pixels,
)


def _stained(h_od, e_od, h_max, e_max, seed, shape=(64, 64)):
    """RGB uint8 of two stains (Beer-Lambert), concentrations uniform on [0.5, 1] x max.

    A fifth of the pixels hold haematoxylin only and a fifth eosin only (nuclei, stroma),
    so the extreme angles Macenko's method looks for are the stains themselves.
    """
    rng = np.random.default_rng(seed)
    stains = np.array([h_od, e_od], dtype=np.float64)
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    c = rng.uniform(0.5, 1.0, (*shape, 2)) * np.array([h_max, e_max])
    which = rng.random(shape)
    c[which < 0.2, 1] = 0.0
    c[which > 0.8, 0] = 0.0
    return np.clip(np.rint(255.0 * np.exp(-(c @ stains)) - 1.0), 0, 255).astype(np.uint8), stains


#: Two centres: another haematoxylin hue and a paler eosin at the source. Each eosin
#: absorbs enough red for its pure pixels to pass the 0.15 OD tissue test in every channel.
SOURCE = ((0.75, 0.60, 0.28), (0.25, 0.85, 0.45), 1.6, 1.5)
TARGET = ((0.65, 0.70, 0.29), (0.30, 0.90, 0.30), 2.0, 2.4)


def test_macenko_maps_the_stain_vectors_and_concentrations_onto_the_target():
    source_rgb, source_stains = _stained(*SOURCE, seed=0)
    target_rgb, target_stains = _stained(*TARGET, seed=1)
    source, target = fit_stain(source_rgb, "macenko"), fit_stain(target_rgb, "macenko")
    # The fit finds the stains an image was made with.
    for fitted, true in ((source, source_stains), (target, target_stains)):
        assert angle_deg(np.array(fitted["stains"][0]), true[0]) < 2
        assert angle_deg(np.array(fitted["stains"][1]), true[1]) < 2
    assert angle_deg(source_stains[0], target_stains[0]) > 5  # the two centres do differ
    normalized = fit_stain(normalize(source_rgb, source, target), "macenko")
    for k in range(2):
        assert angle_deg(np.array(normalized["stains"][k]), target_stains[k]) < 2
    np.testing.assert_allclose(
        normalized["max_concentrations"], target["max_concentrations"], rtol=0.05
    )


def test_reinhard_maps_the_lab_statistics_onto_the_target():
    source_rgb, _ = _stained(*SOURCE, seed=0)
    target_rgb, _ = _stained(*TARGET, seed=1)
    source, target = fit_stain(source_rgb, "reinhard"), fit_stain(target_rgb, "reinhard")
    normalized = fit_stain(normalize(source_rgb, source, target), "reinhard")
    np.testing.assert_allclose(normalized["mean"], target["mean"], atol=1.0)
    np.testing.assert_allclose(normalized["std"], target["std"], rtol=0.05, atol=0.5)


def test_unfit_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 100 stained pixels"):
        fit_stain(np.full((32, 32, 3), 250, dtype=np.uint8), "macenko")  # background only
    with pytest.raises(ValueError, match="Received: method='vahadane'"):
        fit_stain(np.zeros((32, 32, 3), dtype=np.uint8), "vahadane")
    rgb, _ = _stained(*SOURCE, seed=0)
    with pytest.raises(ValueError, match="fits of one method"):
        normalize(rgb, fit_stain(rgb, "macenko"), fit_stain(rgb, "reinhard"))
    # A slide mapped onto its own fit is left (nearly) as it was.
    same = normalize(rgb, fit_stain(rgb, "macenko"), fit_stain(rgb, "macenko"))
    assert np.abs(same.astype(int) - rgb).max() <= 2


#: Weakly separated stains, 15° apart (the synthetic Utrecht centre's, from a TCGA section).
NARROW = ((0.374, 0.761, 0.529), (0.153, 0.878, 0.453), 1.6, 1.5)


def test_a_slide_with_stains_too_close_to_unmix_is_fitted_on_the_targets_vectors():
    narrow_rgb, narrow_stains = _stained(*NARROW, seed=0)
    target = fit_stain(_stained(*TARGET, seed=1)[0], "macenko")
    assert target["angle_deg"] >= MIN_STAIN_ANGLE_DEG
    # As a target (or a reference) it is refused: nothing could be mapped onto it stably.
    with pytest.raises(ValueError, match=r"at least 20° apart to unmix them\. Got 15\.\d°"):
        fit_stain(narrow_rgb, "macenko")
    source = fit_stain(narrow_rgb, "macenko", target=target)
    # Its own vectors are found and recorded, 15° apart ...
    for fitted, true in zip(source["fitted_stains"], narrow_stains, strict=True):
        assert angle_deg(np.array(fitted), true) < 2
    assert abs(source["angle_deg"] - angle_deg(*narrow_stains)) < 1
    assert source["fallback"] == (
        f"stain vectors {source['angle_deg']:.1f}° apart (under 20°): "
        "unmixed with the target's vectors"
    )
    # ... and the target's vectors used, each stain's maximum taken under them.
    assert source["stains"] == target["stains"]
    od = optical_density(narrow_rgb).reshape(-1, 3)
    od = od[(od > OD_TISSUE).all(axis=1)]
    under_target = np.linalg.lstsq(np.asarray(target["stains"]).T, od.T, rcond=None)[0]
    np.testing.assert_allclose(
        source["max_concentrations"],
        np.percentile(under_target, CONCENTRATION_PERCENTILE, axis=1),
        rtol=1e-12,
    )
    # A model trained before the guard (its target records no angle) is served as trained.
    before = {k: v for k, v in target.items() if k != "angle_deg"}
    assert fit_stain(narrow_rgb, "macenko", target=before)["stains"] == source["fitted_stains"]
    # A slide with distinct stains keeps its own fit, target or not.
    wide_rgb, _ = _stained(*SOURCE, seed=0)
    assert fit_stain(wide_rgb, "macenko", target=target) == fit_stain(wide_rgb, "macenko")
    with pytest.raises(ValueError, match="Expected a macenko target. Got a reinhard one"):
        fit_stain(wide_rgb, "macenko", target=fit_stain(wide_rgb, "reinhard"))


#: Pen inks as optical density (the synthetic painter's): blue absorbs red and green,
#: green absorbs red and blue, black absorbs all three alike.
INKS = {"blue": (0.95, 0.55, 0.08), "green": (0.85, 0.22, 0.70), "black": (0.95, 0.95, 0.95)}


def _inked(spec, ink, seed=0, inked_patches=2):
    """16 patches of 32 x 32 px of ``spec``'s stains, the first ``inked_patches`` under a pen mark.

    Under the mark the tissue runs from none (ink on glass) to full density, as
    a mark drawn across a section's edge does.
    """
    rgb, stains = _stained(*spec, seed=seed, shape=(16, 32, 32))
    od = optical_density(rgb)
    rng = np.random.default_rng(seed)
    od[:inked_patches] *= rng.uniform(0.0, 1.0, (inked_patches, 32, 32, 1))
    od[:inked_patches] += np.asarray(ink) * rng.uniform(0.7, 1.2, (inked_patches, 32, 32, 1))
    return np.clip(np.rint(255.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8), stains


@pytest.mark.parametrize("ink", INKS)
@pytest.mark.parametrize("spec", [SOURCE, NARROW], ids=["distinct", "narrow"])
def test_pen_ink_is_left_out_of_the_stain_fit(spec, ink):
    rgb, stains = _inked(spec, INKS[ink])
    target = fit_stain(_stained(*TARGET, seed=1)[0], "macenko")
    fitted = fit_stain(rgb, "macenko", target=target)
    own = fitted.get("fitted_stains", fitted["stains"])  # narrow stains: recorded, not used
    for vector, true in zip(own, stains, strict=True):
        assert angle_deg(np.array(vector), true) < 1
    # The inked patches are left out: the first whole, of the second at least its ink.
    tissue = (optical_density(rgb) > OD_TISSUE).all(axis=-1).sum(axis=(1, 2))
    share = np.cumsum(tissue) / tissue.sum()
    assert share[0] < fitted["ink_fraction"] <= round(share[1], 4)
    # Fitted with the ink, as for a model whose target predates this, haematoxylin is off.
    before = {k: v for k, v in target.items() if k != "ink_fraction"}
    fitted_with_ink = fit_stain(rgb, "macenko", target=before)
    assert "ink_fraction" not in fitted_with_ink
    own = fitted_with_ink.get("fitted_stains", fitted_with_ink["stains"])
    assert angle_deg(np.array(own[0]), stains[0]) > 5
    # Reinhard's statistics leave the same pixels out.
    assert fit_stain(rgb, "reinhard")["ink_fraction"] == fitted["ink_fraction"]


#: A blue-violet haematoxylin whose pixels pass the blue-ink test (blue's OD 0.25 of red's).
VIOLET = ((0.80, 0.55, 0.20), (0.25, 0.85, 0.45), 1.6, 1.5)


def test_clean_stains_lose_no_pixel_and_ink_alone_cannot_be_fitted():
    haematoxylin = np.array([VIOLET[0]])
    assert ink_pixels(haematoxylin).all()  # alone, it passes for blue ink
    assert not ink_pixels(haematoxylin, haematoxylin[0] / np.linalg.norm(haematoxylin)).any()
    for spec in (SOURCE, NARROW, TARGET, VIOLET):
        rgb, _ = _stained(*spec, seed=2, shape=(16, 32, 32))
        kept, ink_fraction = stained_pixels(rgb)
        assert ink_fraction == 0.0
        np.testing.assert_array_equal(kept, stained_pixels(rgb, without_ink=False)[0])
    glass = np.zeros((4, 32, 32, 3))
    ink_only = np.rint(255.0 * np.exp(-(glass + INKS["green"])) - 1.0).astype(np.uint8)
    with pytest.raises(ValueError, match="stained pixels outside pen ink to fit the stain"):
        fit_stain(ink_only, "macenko")


def test_a_real_slide_without_ink_loses_few_pixels(aperio_slide):
    from pipeline.slides.reader import open_slide

    with open_slide(aperio_slide) as reader:
        rgb, _ = reader.overview(1.0)
    kept, ink_fraction = stained_pixels(rgb)
    # CMU-1's darkest nuclei and some green fringes pass for ink: the price, pinned.
    assert 0 < ink_fraction < 0.025
    assert len(kept) > 1_000_000
