"""Header-only eligibility: synthetic headers for every rule and keyword pitfall, then real data."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, MRImageStorage

from liverfat.dicom_io.eligibility import Eligibility, EligibilityPolicy, check_eligibility
from liverfat.errors import Reason

R = Reason


def _ct(**attributes: object) -> Dataset:
    """An unenhanced axial chest CT header that passes every rule; ``None`` deletes an attribute."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 2.5
    ds.StudyDescription = "CT CHEST WO IV CONT"
    ds.SeriesDescription = "CHEST 2.5MM"
    for keyword, value in attributes.items():
        if value is None:
            ds.pop(keyword, None)
        else:
            setattr(ds, keyword, value)
    return ds


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def _enhanced(iop: tuple[float, ...] = (1, 0, 0, 0, 1, 0), thickness: float = 2.5,
              **attributes: object) -> Dataset:
    """An Enhanced CT header whose plane and thickness live in the shared functional groups."""
    ds = _ct(SOPClassUID=EnhancedCTImageStorage, ImageOrientationPatient=None, SliceThickness=None,
             **attributes)
    shared = _item(PlaneOrientationSequence=[_item(ImageOrientationPatient=list(iop))],
                   PixelMeasuresSequence=[_item(SliceThickness=thickness, PixelSpacing=[0.7, 0.7])])
    ds.SharedFunctionalGroupsSequence = [shared]
    return ds


def _codes(*headers: Dataset, policy: EligibilityPolicy = EligibilityPolicy()) -> set[Reason]:
    result = check_eligibility(headers, policy)
    assert result.eligible == (not result.findings)
    return set(result.codes)


# --- the baseline and the CT rule ---------------------------------------------------------------
def test_unenhanced_axial_chest_ct_is_eligible_from_one_or_many_headers() -> None:
    assert check_eligibility([_ct()]) == Eligibility(eligible=True, findings=())
    assert check_eligibility([_ct(), _ct(), _ct()]).eligible


def test_no_headers_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        check_eligibility([])


def test_non_ct_objects_are_rejected_without_further_noise() -> None:
    result = check_eligibility([_ct(Modality="MR", SOPClassUID=MRImageStorage, ImageOrientationPatient=None)])
    assert result.codes == {R.NOT_CT}
    assert any("Modality 'MR'" in f.message and "(0008,0060)" in f.message for f in result.findings)


def test_sop_class_is_taken_from_the_file_meta_when_the_dataset_has_none() -> None:
    ds = _ct(SOPClassUID="")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    assert _codes(ds) == set()
    assert _codes(_ct(SOPClassUID=None)) == {R.MISSING_ATTRIBUTE}


def test_enhanced_ct_reads_the_shared_functional_groups() -> None:
    assert _codes(_enhanced()) == set()
    assert _codes(_enhanced(iop=(0, 1, 0, 0, 0, -1))) == {R.NOT_AXIAL}
    assert _codes(_enhanced(thickness=7.5)) == {R.SLICE_TOO_THICK}


def test_enhanced_ct_per_frame_orientation_counts_every_frame() -> None:
    ds = _enhanced()
    ds.PerFrameFunctionalGroupsSequence = [
        _item(PlaneOrientationSequence=[_item(ImageOrientationPatient=iop)])
        for iop in ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1])]
    assert _codes(ds) == {R.NOT_AXIAL}


def test_enhanced_ct_contrast_usage_decides_over_the_defined_agent() -> None:
    agent = [_item(CodeValue="C-B0322", CodingSchemeDesignator="SRT", CodeMeaning="Iohexol")]
    given, not_given = _enhanced(ContrastBolusAgentSequence=agent), _enhanced(ContrastBolusAgentSequence=agent)
    given.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = [
        _item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES")]
    not_given.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = [
        _item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="NO")]
    assert _codes(given) == {R.CONTRAST}
    assert _codes(not_given) == set()


# --- image type and orientation -----------------------------------------------------------------
@pytest.mark.parametrize(("image_type", "expected"), [
    (["ORIGINAL", "PRIMARY", "LOCALIZER"], {R.LOCALIZER}),
    (["DERIVED", "SECONDARY", "REFORMATTED"], {R.DERIVED_IMAGE}),
    (["DERIVED", "PRIMARY", "AXIAL"], {R.DERIVED_IMAGE}),
    (["ORIGINAL", "PRIMARY", "MPR"], {R.DERIVED_IMAGE}),
    (["ORIGINAL", "PRIMARY", "AXIAL", "MIP"], {R.DERIVED_IMAGE}),
    (["ORIGINAL", "SECONDARY", "AXIAL"], set()),  # LIDC-IDRI re-exports: original pixels
    ("ORIGINAL", set()),
])
def test_image_type_rejects_localizers_and_derived_images(image_type: object, expected: set[Reason]) -> None:
    assert _codes(_ct(ImageType=image_type)) == expected


@pytest.mark.parametrize("description", ["TOPOGRAM 0.6 T20f", "SCOUT", "CHEST MIP 10MM", "LUNG 3D VR"])
def test_series_description_names_localizers_and_projections(description: str) -> None:
    assert _codes(_ct(SeriesDescription=description)) & {R.LOCALIZER, R.DERIVED_IMAGE}


@pytest.mark.parametrize(("iop", "axial"), [
    ([1, 0, 0, 0, 1, 0], True),
    ([-1, 0, 0, 0, -1, 0], True),                       # rotated in plane
    ([1, 0, 0, 0, -1, 0], True),                        # flipped rows (normal points inferior)
    ([1, 0, 0, 0, 0.9848, 0.1736], True),               # 10 deg gantry tilt
    ([1, 0, 0, 0, 0.9397, 0.3420], False),              # 20 deg: too oblique
    ([1, 0, 0, 0, 0, -1], False),                       # coronal
    ([0, 1, 0, 0, 0, -1], False),                       # sagittal
])
def test_axial_means_normal_within_the_tolerance_of_the_si_axis(iop: list[float], axial: bool) -> None:
    assert (R.NOT_AXIAL not in _codes(_ct(ImageOrientationPatient=iop))) == axial


def test_axial_tolerance_is_configurable_and_the_message_names_the_plane() -> None:
    tilted = _ct(ImageOrientationPatient=[1, 0, 0, 0, 0.9397, 0.3420])
    assert _codes(tilted, policy=EligibilityPolicy(max_axial_deviation_deg=25)) == set()
    message = check_eligibility([_ct(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])]).findings[0].message
    assert "sagittal" in message and "(0020,0037)" in message


def test_one_non_axial_instance_rejects_the_series() -> None:
    assert _codes(_ct(), _ct(ImageOrientationPatient=[1, 0, 0, 0, 0, -1])) == {R.NOT_AXIAL}


def test_missing_orientation_or_image_type_is_a_missing_attribute() -> None:
    assert _codes(_ct(ImageOrientationPatient=None)) == {R.MISSING_ATTRIBUTE}
    assert _codes(_ct(ImageType=None)) == {R.MISSING_ATTRIBUTE}


# --- slice thickness ----------------------------------------------------------------------------
def test_slice_thickness_limit_is_inclusive_and_reported_with_the_tag() -> None:
    assert _codes(_ct(SliceThickness=5.0)) == set()
    result = check_eligibility([_ct(), _ct(SliceThickness=7.5)])
    assert result.codes == {R.SLICE_TOO_THICK}
    assert "7.5 mm exceeds the 5 mm limit" in result.findings[0].message
    assert "(0018,0050)" in result.findings[0].message


def test_slice_thickness_missing_or_empty_is_a_missing_attribute() -> None:
    assert _codes(_ct(SliceThickness=None)) == {R.MISSING_ATTRIBUTE}
    assert _codes(_ct(SliceThickness="")) == {R.MISSING_ATTRIBUTE}
    result = check_eligibility([_ct(), _ct(SliceThickness=None)])
    assert result.codes == {R.MISSING_ATTRIBUTE}
    assert "absent or empty in 1 of 2 instances" in result.findings[0].message


# --- anatomy ------------------------------------------------------------------------------------
def test_missing_body_part_is_fine_when_a_description_says_chest() -> None:
    assert _codes(_ct(BodyPartExamined=None, StudyDescription="CT THORAX NATIVE", SeriesDescription="5MM")) == set()


def test_body_part_alone_or_anatomic_region_code_says_chest() -> None:
    assert _codes(_ct(StudyDescription=None, SeriesDescription=None, BodyPartExamined="CHEST")) == set()
    region = [_item(CodeValue="51185008", CodingSchemeDesignator="SCT", CodeMeaning="Thorax")]
    assert _codes(_ct(StudyDescription=None, SeriesDescription=None, AnatomicRegionSequence=region)) == set()


def test_no_anatomical_information_at_all_leaves_the_region_to_the_image() -> None:
    bare = _ct(StudyDescription=None, SeriesDescription=None)
    result = check_eligibility([bare])
    assert result.eligible and result.findings == ()
    assert result.region_from_image
    assert [f.code for f in result.pending] == [R.REGION_FROM_IMAGE]
    assert "no header names a body part" in result.pending[0].message
    assert "(0018,0015)" in result.pending[0].message  # BodyPartExamined is named for the administrator
    assert result.to_json()["pending"] == [result.pending[0].to_json()]


def test_silent_headers_are_not_chest_when_the_policy_does_not_let_the_image_decide() -> None:
    bare = _ct(StudyDescription=None, SeriesDescription=None)
    result = check_eligibility([bare], EligibilityPolicy(region_from_image=False))
    assert result.codes == {R.NOT_CHEST} and not result.region_from_image
    assert "no body part or description says chest" in result.findings[0].message
    relaxed = check_eligibility([bare], EligibilityPolicy(require_chest_evidence=False))
    assert relaxed.eligible and relaxed.pending == ()


@pytest.mark.parametrize("description", ["5/5mm Plain", "STANDARD 2.5MM", "Body 5.0", "ROUTINE", "AXIAL 1.25"])
def test_descriptions_that_name_no_region_leave_it_to_the_image(description: str) -> None:
    result = check_eligibility([_ct(StudyDescription=None, SeriesDescription=description)])
    assert result.eligible and result.region_from_image


@pytest.mark.parametrize("attributes", [
    {"SeriesDescription": "CT HEAD/NK 5.0 B30s"},
    {"StudyDescription": "CT2 tête, face, sinus"},                    # accents folded: TETE, FACE, SINUS
    {"ProtocolName": "LUMBAR SPINE ROUTINE"},
    {"SeriesDescription": "KNEE BONE 1MM"},
    {"BodyPartExamined": "NECK"},
    {"BodyPartExamined": "EXTREMITY"},
    {"BodyPartExamined": "SOMEWHERE"},                                 # any body part value is a statement
    {"AnatomicRegionSequence": [_item(CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")]},
])
def test_a_header_naming_another_region_still_rejects_from_the_headers(attributes: dict[str, object]) -> None:
    result = check_eligibility([_ct(**{"StudyDescription": None, "SeriesDescription": None, **attributes})])
    assert result.codes == {R.NOT_CHEST}
    assert not result.region_from_image
    assert "no body part or description says chest" in result.findings[0].message


def test_other_region_keywords_are_configurable() -> None:
    policy = EligibilityPolicy(other_region_keywords=("HEAD",))
    assert check_eligibility([_ct(StudyDescription=None, SeriesDescription="KNEE")], policy).region_from_image
    assert _codes(_ct(StudyDescription=None, SeriesDescription="HEAD"), policy=policy) == {R.NOT_CHEST}


@pytest.mark.parametrize("attributes", [
    {"StudyDescription": "CT ABD AND PELVIS WO IV CONT"},
    {"StudyDescription": "CT CHEST/ABD/PEL (NON CONTRAST)"},         # chest-to-pelvis
    {"StudyDescription": "CT CHEST ABDOMEN WO"},                      # chest-abdomen
    {"ProtocolName": "CAP ROUTINE"},
    {"SeriesDescription": "CHEST 2.5 MM/ABD.PEL 2.5MM"},
    {"BodyPartExamined": "ABDOMEN"},
    {"BodyPartExamined": "WHOLEBODY"},
    {"ProtocolName": "6.9 Colonoscopy"},
    {"AnatomicRegionSequence": [_item(CodeValue="818981001", CodingSchemeDesignator="SCT",
                                      CodeMeaning="Abdomen")]},
])
def test_any_abdominal_region_rejects_even_next_to_chest(attributes: dict[str, object]) -> None:
    assert _codes(_ct(**attributes)) == {R.ABDOMINAL}


def test_abdominal_message_names_tag_value_and_words() -> None:
    finding = check_eligibility([_ct(StudyDescription="CT ABD AND PELVIS WO IV CONT")]).findings[0]
    assert finding.message == ("StudyDescription 'CT ABD AND PELVIS WO IV CONT' names a region that "
                               "includes the abdomen (ABD, PELVIS), see (0008,1030)")


# --- contrast: tags -----------------------------------------------------------------------------
def test_contrast_agent_tag_rejects_and_names_tag_and_value() -> None:
    result = check_eligibility([_ct(ContrastBolusAgent="IV")])
    assert result.codes == {R.CONTRAST}
    assert "ContrastBolusAgent 'IV'" in result.findings[0].message
    assert "(0018,0010)" in result.findings[0].message


@pytest.mark.parametrize(("attributes", "expected"), [
    ({"ContrastBolusAgent": ""}, set()),                              # empty proves nothing, rejects nothing
    ({"ContrastBolusAgent": "NONE"}, set()),
    ({"ContrastBolusAgent": "NO", "ContrastBolusRoute": "N/A"}, set()),
    ({"ContrastBolusAgent": "NO CONTRAST"}, set()),
    ({"ContrastBolusAgent": "NON IONIC"}, {R.CONTRAST}),
    ({"ContrastBolusAgent": "APPLIED"}, {R.CONTRAST}),                # any named agent
    ({"ContrastBolusAgent": "ORAL/RECTAL & IV CONTRAST"}, {R.CONTRAST}),
    ({"ContrastBolusAgent": "", "ContrastBolusRoute": "IV"}, {R.CONTRAST}),
    ({"ContrastBolusVolume": 80}, {R.CONTRAST}),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "ANGIO", "NONE"]}, {R.CONTRAST}),  # Enhanced CT frame flavour
    ({"ContrastBolusVolume": 0}, set()),
    ({"ContrastBolusStartTime": "140216"}, {R.CONTRAST}),
    ({"ContrastBolusAgentSequence": [_item(CodeValue="C-B0322", CodingSchemeDesignator="SRT",
                                           CodeMeaning="Iohexol")]}, {R.CONTRAST}),
])
def test_contrast_tags(attributes: dict[str, object], expected: set[Reason]) -> None:
    assert _codes(_ct(**attributes)) == expected


def test_empty_contrast_tag_does_not_clear_a_description_that_says_contrast() -> None:
    assert _codes(_ct(StudyDescription="CT CHEST WITH IV CONT", ContrastBolusAgent="")) == {R.CONTRAST}


def test_a_contrast_tag_outweighs_a_description_that_says_without() -> None:
    assert _codes(_ct(StudyDescription="CT CHEST WO IV CONT", ContrastBolusAgent="OMNIPAQUE 350")) == {R.CONTRAST}


# --- contrast: descriptions and their pitfalls --------------------------------------------------
@pytest.mark.parametrize("description", [
    "CTA CHEST W IV CONT", "CT CHEST W IV CON", "CT CHEST W/ IV CONTRAST", "CT CHEST WITH CONTRAST",
    "CT CHEST WWO IV CONT", "CT CHEST W WO IV CONTRAST", "CT CHEST W&WO", "CT CHEST W/WO",
    "CT CHEST WITH AND WITHOUT CONTRAST", "CT CHEST CE", "CT CHEST C+", "CHEST +C",
    "CT ANGIO CHEST", "CT CHEST PULMONARY ANGIO", "CHEST PE PROTOCOL", "5.10 PE>200 LBS",
    "CHEST ARTERIAL", "CHEST PORTAL VENOUS", "CHEST VENOUS PHASE", "CHEST DELAYED",
    "ENHANCED CHEST", "CHEST IV", "CONTRAST ENHANCED CHEST", "THORAX MIT KM", "CHEST NON-IONIC",
    "CHEST 5MM VNC", "CHEST BOLUS TRACKING", "NON CON CHEST THEN ANGIO", "CT CHEST W", "CT CHEST W I.V. CON",
    "CT CHEST WITH & WITHOUT IV CONTRAST", "CT CHEST PRE/POST CONTRAST", "CT THORAX AVEC INJECTION",
])
def test_descriptions_that_mention_contrast_reject(description: str) -> None:
    assert _codes(_ct(StudyDescription=description)) == {R.CONTRAST}


@pytest.mark.parametrize("description", [
    "CT CHEST WO IV CONT", "CT CHEST W/O CONTRAST", "CT CHEST WITHOUT IV CONTRAST",
    "CT CHEST NON CON", "CT CHEST NON-CONTRAST", "CT CHEST NONCONTRAST", "CHEST NC",
    "CHEST PLAIN", "THORAX NATIVE", "Chest HCT 5mm  -C", "CT CHEST NO IV OR ORAL CONTRAST",
    "CT CHEST WO", "THORAX OHNE KM", "TORAX SIN CONTRASTE", "CT CHEST UNENHANCED", "CT CHEST WO I.V. CONTRAST",
    "CT THORAX SANS INJECTION", "TORACE SENZA MDC",
    "CT CHEST SPECIAL", "CT CHEST LOW DOSE CENTERED", "CT CHEST PEDIATRIC", "CT CHEST", "Thorax nativ",
])
def test_descriptions_that_negate_contrast_or_contain_lookalikes_are_eligible(description: str) -> None:
    assert _codes(_ct(StudyDescription=description)) == set()


def test_pe_and_ce_match_whole_words_only() -> None:
    assert _codes(_ct(StudyDescription="CT PELVIS")) == {R.ABDOMINAL}   # PE inside PELVIS: no contrast
    assert _codes(_ct(StudyDescription="CT CHEST PE")) == {R.CONTRAST}


def test_contrast_message_names_tag_value_and_matched_words() -> None:
    finding = check_eligibility([_ct(StudyDescription="CTA CHEST W IV CONT")]).findings[0]
    assert finding.message == ("StudyDescription 'CTA CHEST W IV CONT' mentions contrast (CTA, W IV CONT), "
                               "see (0008,1030)")


def test_every_reason_is_reported_not_only_the_first() -> None:
    ds = _ct(ImageType=["DERIVED", "SECONDARY", "REFORMATTED"], ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
             SliceThickness=7.5, StudyDescription="CT ABD AND PELVIS WITH IV CONT")
    assert _codes(ds) == {R.DERIVED_IMAGE, R.NOT_AXIAL, R.SLICE_TOO_THICK, R.ABDOMINAL, R.CONTRAST}


# --- with-and-without studies and oral contrast -------------------------------------------------
def test_series_of_a_with_and_without_study_is_accepted_only_when_its_own_label_says_unenhanced() -> None:
    study = "CT CHEST W WO IV CONT"
    assert _codes(_ct(StudyDescription=study, SeriesDescription="CHEST WO CONTRAST 5MM")) == set()
    assert _codes(_ct(StudyDescription=study, SeriesDescription="NON CON 5MM")) == set()
    assert _codes(_ct(StudyDescription=study, SeriesDescription="CHEST 5MM")) == {R.CONTRAST}
    assert _codes(_ct(StudyDescription=study, SeriesDescription="WO 5MM ARTERIAL")) == {R.CONTRAST}
    assert _codes(_ct(StudyDescription=study, SeriesDescription="CHEST WO 5MM",
                      ContrastBolusAgent="OMNIPAQUE")) == {R.CONTRAST}
    strict = EligibilityPolicy(accept_unenhanced_series_of_mixed_study=False)
    assert _codes(_ct(StudyDescription=study, SeriesDescription="CHEST WO CONTRAST 5MM"), policy=strict) == {R.CONTRAST}


def test_unenhanced_label_does_not_rescue_a_series_of_a_contrast_study() -> None:
    assert _codes(_ct(StudyDescription="CT CHEST W IV CONT", SeriesDescription="NON CON 5MM")) == {R.CONTRAST}


@pytest.mark.parametrize("attributes", [
    {"StudyDescription": "CT CHEST W ORAL CONTRAST"},
    {"StudyDescription": "CT CHEST W ORAL"},
    {"StudyDescription": "CT CHEST WITH ORAL CONT ONLY"},
    {"ContrastBolusAgent": "ORAL"},
    {"ContrastBolusAgent": "BARIUM", "ContrastBolusRoute": "ORAL", "ContrastBolusVolume": 450},
    {"ContrastBolusAgentSequence": [_item(CodeValue="C-B0316", CodingSchemeDesignator="SRT",
                                          CodeMeaning="Barium sulfate", AdministrationRouteCodeSequence=[_item(
                                              CodeValue="26643006", CodingSchemeDesignator="SCT",
                                              CodeMeaning="Oral route")])]},
])
def test_oral_contrast_alone_is_accepted_by_default_and_rejected_by_a_strict_policy(
        attributes: dict[str, object]) -> None:
    assert _codes(_ct(**attributes)) == set()
    assert _codes(_ct(**attributes), policy=EligibilityPolicy(oral_contrast_is_contrast=True)) == {R.CONTRAST}


def test_an_agent_also_given_intravenously_counts_as_contrast_even_by_the_oral_route() -> None:
    assert _codes(_ct(ContrastBolusAgent="OMNIPAQUE", ContrastBolusRoute="ORAL")) == {R.CONTRAST}


@pytest.mark.parametrize("description", ["CT CHEST W ORAL AND IV CONTRAST", "CT CHEST W IV AND ORAL CONTRAST",
                                         "CHEST ORAL/RECTAL & IV CONTRAST"])
def test_oral_with_iv_contrast_is_contrast(description: str) -> None:
    assert _codes(_ct(StudyDescription=description)) == {R.CONTRAST}


# --- policy -------------------------------------------------------------------------------------
def test_policy_from_mapping_overrides_values_and_converts_lists() -> None:
    policy = EligibilityPolicy.from_mapping({"max_slice_thickness_mm": 8, "contrast_keywords": ["SPECIAL"],
                                             "require_chest_evidence": False})
    assert policy.max_slice_thickness_mm == 8.0
    assert policy.contrast_keywords == ("SPECIAL",)
    assert _codes(_ct(SliceThickness=7.5), policy=policy) == set()
    assert _codes(_ct(StudyDescription="CT CHEST SPECIAL"), policy=policy) == {R.CONTRAST}
    assert EligibilityPolicy.from_mapping({}) == EligibilityPolicy()
    assert EligibilityPolicy.from_mapping({"region_from_image": False}).region_from_image is False


def test_policy_from_mapping_rejects_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(ValueError, match="unknown eligibility setting.*max_slice_thickness"):
        EligibilityPolicy.from_mapping({"max_slice_thicknes_mm": 5.0})
    with pytest.raises(ValueError, match="contrast_keywords"):
        EligibilityPolicy.from_mapping({"contrast_keywords": "CONTRAST"})
    with pytest.raises(ValueError, match="max_slice_thickness_mm"):
        EligibilityPolicy.from_mapping({"max_slice_thickness_mm": "5"})
    with pytest.raises(ValueError, match="require_chest_evidence"):
        EligibilityPolicy.from_mapping({"require_chest_evidence": 1})


def test_policy_rejects_meaningless_values() -> None:
    with pytest.raises(ValueError, match="chest_keywords"):
        EligibilityPolicy(chest_keywords=("CHEST", " / "))
    with pytest.raises(ValueError, match="contrast_keywords"):
        EligibilityPolicy(contrast_keywords=("",))
    with pytest.raises(ValueError, match="max_axial_deviation_deg"):
        EligibilityPolicy(max_axial_deviation_deg=0)
    with pytest.raises(ValueError, match="not DICOM keywords"):
        EligibilityPolicy(description_tags=("SeriesDescriptoin",))


# --- real headers ---------------------------------------------------------------------------------
# Every series under ../shared/data: key (folder, or file where a folder holds several series) ->
# (SeriesDescription, eligible, reason codes), the decisions a radiologist would make.
_REAL_DATA: dict[str, tuple[str, bool, set[Reason]]] = {
    # Portal-venous abdomen whose headers name neither anatomy nor contrast: eligible from the headers,
    # the region is left to the image (which shows too little lung: NOT_CHEST, see test_analyze_image_checks).
    "3dircadb-1.1/PATIENT_DICOM": ("", True, set()),
    "3dircadb-1.1/MASKS_DICOM/liver": ("", True, set()),  # a mask stored as CT images: the image check refuses it
    # Whole unenhanced chests; A0002's 8 mm slices exceed the 5 mm limit
    "chest-ct/lidc-idri-0002": ("", True, set()),
    "chest-ct/lung-pet-ct-dx-a0001": ("5mm", True, set()),
    "chest-ct/lung-pet-ct-dx-a0002": ("ThoraxRoutine  8.0.0  B40f", False, {R.SLICE_TOO_THICK}),
    "lidc-idri-partial/LIDC-IDRI-0001_ctIV_16sl": ("", False, {R.CONTRAST}),
    "lidc-idri-partial/LIDC-IDRI-0002_noCBA_12sl": ("", True, set()),
    "lidc-idri-partial/LIDC-IDRI-0003_oralIV_11sl": ("", False, {R.CONTRAST}),
    # A002304: abdomen/pelvis with IV contrast (scanned chest to pelvis), and a CT pulmonary angiogram
    "covid19-ny-sbu/A002304/axial/19001231-076.dcm": ("CHEST 2.5 MM/ABD.PEL 2.5MM", False, {R.ABDOMINAL, R.CONTRAST}),
    "covid19-ny-sbu/A002304/coronal/19001231-076.dcm": (
        "CHEST CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL, R.CONTRAST}),
    "covid19-ny-sbu/A002304/sagittal/19001231-080.dcm": (
        "CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL, R.CONTRAST}),
    "covid19-ny-sbu/A002304/axial/19010112-135.dcm": ("CHEST 1.25 MM", False, {R.CONTRAST}),
    "covid19-ny-sbu/A002304/coronal/19010112-124.dcm": (
        "1 25 MM CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.CONTRAST}),
    "covid19-ny-sbu/A002304/sagittal/19010112-134.dcm": (
        "1 25 MM SAGITAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.CONTRAST}),
    # A027284: two abdomen/pelvis studies without contrast (trauma chest/abd/pel protocol)
    "covid19-ny-sbu/A027284/axial/19000925-116.dcm": ("STANDARD 2.5MM", False, {R.ABDOMINAL}),
    "covid19-ny-sbu/A027284/axial/19001231-131.dcm": ("STANDARD 2.5MM", False, {R.ABDOMINAL}),
    "covid19-ny-sbu/A027284/coronal/19000925-058.dcm": (
        "ABD CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A027284/coronal/19001231-070.dcm": (
        "ABD CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A027284/sagittal/19000925-083.dcm": (
        "CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A027284/sagittal/19001231-081.dcm": (
        "CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    # A046441: abdomen/pelvis without contrast, and a chest without contrast (Toshiba, "-C")
    "covid19-ny-sbu/A046441/axial/19001111-045.dcm": ("STANDARD 2.5MM", False, {R.ABDOMINAL}),
    "covid19-ny-sbu/A046441/coronal/19001111-056.dcm": (
        "ABD CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A046441/sagittal/19001111-059.dcm": (
        "CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A046441/axial/19010101-23.dcm": ("Body 5.0", True, set()),
    "covid19-ny-sbu/A046441/coronal/19010101-43.dcm": ("Body 3.000", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    "covid19-ny-sbu/A046441/sagittal/19010101-050.dcm": ("Body 3.000", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    # A048383: two chests without contrast
    "covid19-ny-sbu/A048383/axial/19001231-30.dcm": ("5 MM STANDARD", True, set()),
    "covid19-ny-sbu/A048383/axial/19010410-30.dcm": ("CHEST 5X5", True, set()),
    "covid19-ny-sbu/A048383/coronal/19001231-057.dcm": ("CHEST CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    "covid19-ny-sbu/A048383/coronal/19010410-052.dcm": ("COR 3MM", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    "covid19-ny-sbu/A048383/sagittal/19001231-065.dcm": ("CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    "covid19-ny-sbu/A048383/sagittal/19010410-060.dcm": ("SAG 3MM", False, {R.DERIVED_IMAGE, R.NOT_AXIAL}),
    # A056642: abdomen/pelvis without contrast, and a CT pulmonary angiogram
    "covid19-ny-sbu/A056642/axial/19001229-053.dcm": ("STANDARD 2.5mm", False, {R.ABDOMINAL}),
    "covid19-ny-sbu/A056642/coronal/19001229-050.dcm": (
        "ABD CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A056642/sagittal/19001229-062.dcm": (
        "CHEST SAGITTAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.ABDOMINAL}),
    "covid19-ny-sbu/A056642/axial/19010107-111.dcm": ("CHEST 1.25 MM", False, {R.CONTRAST}),
    "covid19-ny-sbu/A056642/coronal/19010107-123.dcm": (
        "1 25 MM CORONAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.CONTRAST}),
    "covid19-ny-sbu/A056642/sagittal/19010107-137.dcm": (
        "1 25 MM SAGITAL", False, {R.DERIVED_IMAGE, R.NOT_AXIAL, R.CONTRAST}),
    "misc-dicom/693_UNCI.dcm": ("5/5mm Plain", False, {R.DERIVED_IMAGE}),  # region silent, left to the image
    "misc-dicom/explicit_VR-UN.dcm": ("Pancreas", False, {R.ABDOMINAL, R.MISSING_ATTRIBUTE}),
    "misc-dicom/liver.dcm": ("Liver Segmentation", False, {R.NOT_CT}),
    "misc-dicom/Comunix_CT_headneck": ("CT HEAD/NK 5.0 B30s", False, {R.NOT_CHEST}),
    "misc-dicom/Phenix_CT_head": ("", False, {R.LOCALIZER, R.NOT_AXIAL, R.NOT_CHEST}),
    "misc-dicom/ct-3slice_colonography": ("", False, {R.ABDOMINAL}),
    # PET/CT, skull base to thigh (PARTIALBODY), ContrastBolusAgent APPLIED, protocol "..._KM"
    "totalsegmentator-example/example_ct_dicom": ("CT Body 3.0", False, {R.ABDOMINAL, R.CONTRAST}),
}

# The series whose headers name no body region at all: the image decides.
_REGION_FROM_IMAGE = {"3dircadb-1.1/PATIENT_DICOM", "3dircadb-1.1/MASKS_DICOM/liver", "misc-dicom/693_UNCI.dcm"}


def _real_series(root: Path) -> dict[str, list[Dataset]]:
    """Headers of every DICOM image series under ``root``, keyed like ``_REAL_DATA``."""
    series: dict[tuple[Path, str], list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except (InvalidDicomError, ValueError, EOFError, OSError):
            continue
        if "SeriesInstanceUID" in ds and "Modality" in ds:  # force=True also "reads" text files
            series[(path.parent, ds.SeriesInstanceUID or "(empty)")].append((path, ds))
    per_folder: dict[Path, int] = defaultdict(int)
    for folder, _ in series:
        per_folder[folder] += 1
    return {str((files[0][0] if per_folder[folder] > 1 else folder).relative_to(root)): [ds for _, ds in files]
            for (folder, _), files in series.items()}


@pytest.mark.shared_data
def test_every_real_series_gets_the_radiologists_decision(shared_data: Path) -> None:
    series = _real_series(shared_data)
    assert sorted(series) == sorted(_REAL_DATA)
    decisions = {key: (str(headers[0].get("SeriesDescription") or ""), check_eligibility(headers).eligible,
                       set(check_eligibility(headers).codes)) for key, headers in series.items()}
    assert decisions == _REAL_DATA
    left_to_image = {key for key, headers in series.items() if check_eligibility(headers).region_from_image}
    assert left_to_image == _REGION_FROM_IMAGE

