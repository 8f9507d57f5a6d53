"""The pixel checks on synthetic volumes: is it a CT in HU, and does it show the chest and the liver dome?"""

from __future__ import annotations

import numpy as np
import pytest

from liverfat.errors import Reason
from liverfat.inference.image_checks import (
    MIN_BELOW_RIGHT_LUNG_BASE_MM,
    MIN_LUNG_VOLUME_ML,
    intensity_profile,
    not_ct_finding,
    region_evidence,
    region_finding,
)
from liverfat.volume import Volume
from tests.chest_phantom import CHEST_GRID, LUNG_HU, ChestPhantom
from tests.phantom import Grid, Phantom, render_volume, storage_variants

ABDOMEN_GRID = Grid(rows=64, columns=64, pixel_spacing_mm=5.6, slice_positions_mm=tuple(np.arange(-150.0, 40.1, 5.0)))


@pytest.fixture(scope="module")
def chest() -> tuple[Volume, Volume]:
    """(CT, liver mask) of the chest phantom on ``CHEST_GRID``."""
    return render_volume(ChestPhantom(), CHEST_GRID)


# --- is it a CT? ------------------------------------------------------------------------------------
def test_phantom_and_chest_phantom_are_cts(chest: tuple[Volume, Volume]) -> None:
    assert not_ct_finding(chest[0]) is None
    assert not_ct_finding(render_volume(Phantom(), Grid())[0]) is None


def test_a_binary_mask_is_not_a_ct_and_the_message_says_what_was_seen(chest: tuple[Volume, Volume]) -> None:
    mask = chest[1].with_array(chest[1].array.astype(np.uint8))
    finding = not_ct_finding(mask)
    assert finding is not None and finding.code is Reason.NOT_CT_IMAGE
    assert "values 0 to 1 in 2 distinct levels" in finding.message
    assert "0.0% of voxels below -500 HU, expected at least 2%" in finding.message
    assert "only 2 distinct values, expected at least 16" in finding.message


def test_a_multi_label_map_is_not_a_ct(chest: tuple[Volume, Volume]) -> None:
    ct = chest[0].array
    labels = np.select([ct < -500, ct < 42, ct < 52], [0, 1, 2], default=5).astype(np.int16)  # air, body, spleen, liver
    finding = not_ct_finding(chest[0].with_array(labels))
    assert finding is not None and finding.code is Reason.NOT_CT_IMAGE


def test_a_probability_map_is_not_a_ct_even_with_many_distinct_values(chest: tuple[Volume, Volume]) -> None:
    rng = np.random.default_rng(0)
    probabilities = (chest[1].array * 0.8 + rng.uniform(0.0, 0.2, chest[1].array.shape)).astype(np.float32)
    profile = intensity_profile(chest[1].with_array(probabilities))
    assert profile.distinct_values > 1000 and profile.air_or_lung_fraction == 0.0
    finding = not_ct_finding(chest[1].with_array(probabilities))
    assert finding is not None and "below -500 HU" in finding.message and "distinct values" not in finding.message


def test_a_mask_scaled_to_hu_is_refused_for_its_few_levels(chest: tuple[Volume, Volume]) -> None:
    """-1000 outside, 50 inside: air and soft tissue are there, the noise of a real CT is not."""
    scaled = np.where(chest[0].array > -500, 50.0, -1000.0).astype(np.float32)
    finding = not_ct_finding(chest[0].with_array(scaled))
    assert finding is not None and finding.message.count("expected at least") == 1
    assert "only 2 distinct values" in finding.message


def test_an_image_of_air_only_lacks_soft_tissue() -> None:
    air = np.random.default_rng(1).normal(-1000.0, 20.0, (8, 32, 32)).astype(np.float32)
    finding = not_ct_finding(Volume(air, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0)))
    assert finding is not None and "between -100 and 200 HU, expected at least 5%" in finding.message


# --- does it show the chest and the liver dome? ----------------------------------------------------------
def test_chest_phantom_shows_its_lungs_and_the_liver_dome(chest: tuple[Volume, Volume]) -> None:
    exact, _ = render_volume(ChestPhantom(noise_sd_hu=0.0), CHEST_GRID)
    truth_ml = float((exact.array == LUNG_HU).sum() * np.prod(exact.spacing) / 1000.0)
    evidence = region_evidence(chest[0])
    assert evidence.lung_volume_ml == pytest.approx(truth_ml, rel=0.05)
    # the right lung is widest at z = 150 and half as wide 92 mm lower; the scan starts at z = -60
    assert evidence.below_right_lung_base_mm == pytest.approx(150.0 - 130.0 * np.sqrt(0.5) + 60.0, abs=6.0)
    finding = region_finding(chest[0])
    assert finding.code is Reason.REGION_FROM_IMAGE
    assert f"lung volume {evidence.lung_volume_ml:.0f} ml" in finding.message


@pytest.mark.parametrize("variant", sorted(storage_variants(CHEST_GRID)))
def test_region_evidence_does_not_depend_on_storage_order(variant: str, chest: tuple[Volume, Volume]) -> None:
    stored, _ = render_volume(ChestPhantom(), storage_variants(CHEST_GRID)[variant])
    expected = region_evidence(chest[0])
    found = region_evidence(stored)
    assert found.lung_volume_ml == pytest.approx(expected.lung_volume_ml, rel=0.02)
    assert found.below_right_lung_base_mm == pytest.approx(expected.below_right_lung_base_mm, abs=1.0)


def test_an_abdomen_without_lungs_is_not_a_chest() -> None:
    ct, _ = render_volume(Phantom(), ABDOMEN_GRID)
    evidence = region_evidence(ct)
    assert evidence.lung_volume_ml == 0.0 and evidence.below_right_lung_base_mm is None
    finding = region_finding(ct)
    assert finding.code is Reason.NOT_CHEST
    assert "does not show the lungs and the liver dome" in finding.message
    assert f"lung volume 0 ml in the field of view" in finding.message
    assert f"a chest CT shows at least {MIN_LUNG_VOLUME_ML:.0f} ml" in finding.message


def test_a_chest_that_stops_above_the_diaphragm_does_not_show_the_liver_dome() -> None:
    upper = Grid(rows=64, columns=64, pixel_spacing_mm=5.6, slice_positions_mm=tuple(np.arange(90.0, 270.1, 5.0)))
    ct, _ = render_volume(ChestPhantom(), upper)
    evidence = region_evidence(ct)
    assert evidence.shows_lungs and not evidence.shows_liver_dome
    assert evidence.below_right_lung_base_mm is not None
    assert evidence.below_right_lung_base_mm < MIN_BELOW_RIGHT_LUNG_BASE_MM
    finding = region_finding(ct)
    assert finding.code is Reason.NOT_CHEST and "does not show the liver dome:" in finding.message


def test_lung_density_outside_the_body_is_not_lung() -> None:
    """A field of -800 HU around the body (a blanket, a cushion, a badly calibrated air) is not inside it."""
    ct, _ = render_volume(Phantom(), ABDOMEN_GRID)
    surrounded = np.where(ct.array > -500, ct.array, -800.0).astype(np.float32)
    assert region_evidence(ct.with_array(surrounded)).lung_volume_ml == 0.0


def test_lung_density_inside_the_body_counts_and_pure_gas_does_not() -> None:
    """Bowel gas (-1000 HU, inside the body) is not lung; the same pocket at -850 HU is."""
    ct, _ = render_volume(Phantom(), ABDOMEN_GRID)
    lps = ct.to_lps(np.stack(np.meshgrid(*(np.arange(n) for n in ct.size), indexing="ij"), axis=-1))
    pocket = (np.linalg.norm(lps - np.array([40.0, 0.0, -100.0]), axis=-1) < 35.0).transpose(2, 1, 0)
    gas = region_evidence(ct.with_array(np.where(pocket, -1000.0, ct.array).astype(np.float32)))
    lung_like = region_evidence(ct.with_array(np.where(pocket, -850.0, ct.array).astype(np.float32)))
    assert gas.lung_volume_ml == 0.0
    assert lung_like.lung_volume_ml == pytest.approx(4 / 3 * np.pi * 35.0**3 / 1000.0, rel=0.3)
