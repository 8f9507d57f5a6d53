"""Every coded concept the DICOM writers use, as a named constant.

The builders in ``seg.py``, ``sr.py`` and ``keyimage.py`` never spell a code value
themselves; they import it from here, so a reviewer can check the vocabulary in one place.

Choices that are ours (the standard offers more than one way):

- **Grade.** The method answers one binary question: is there *moderate-to-severe*
  hepatic steatosis (graded DL-parenchymal attenuation below the threshold)? It cannot
  tell "no steatosis" from "mild steatosis", so a liver above the threshold must not be
  coded "steatosis absent" (and never "absent" beside a severity "moderate to severe",
  which reads as a contradiction). The qualitative evaluation therefore names the
  method's question itself, ``99LIVERFAT MODSEV-STEATOSIS`` "Moderate-to-severe hepatic
  steatosis" (no SNOMED CT concept for "moderate to severe steatosis of liver" exists;
  the post-coordinated SCT form needs a severity modifier beside a negative value), and
  answers it with SNOMED CT qualifier values: SCT 52101004 "Present" (below the
  threshold), SCT 260415000 "Not detected" (not below it: moderate-to-severe steatosis
  not shown, mild steatosis not excluded; 260415000 is not in pydicom's dictionary) or
  SCT 373068000 "Undetermined" (grade withheld). The measurement group's finding type
  stays the standard SCT 197321007 "Steatosis of liver" (synonym "Fatty liver"; also
  not in pydicom's dictionary), so a reader that knows no private code still finds the
  topic.
- **Borderline.** When the graded value lies within the method's mean absolute error
  (``borderline_margin_hu``) of the threshold, a second qualitative evaluation says so:
  DCM 111012 "Certainty of Finding" = SCT 42425007 "Equivocal". "Certainty of Finding"
  is the concept the CAD report templates use for how sure a machine finding is (there as
  a number; here coded, because the method gives no probability), and "Equivocal" is
  SNOMED CT's qualifier for a result that neither confirms nor excludes. The item is
  absent when the value is clear of the margin, and on a withheld grade.
- **Threshold.** DCM 112032 "Threshold Attenuation Coefficient", in [hnsf'U].
- **Which mean.** Every liver attenuation is DCM 112031 "Attenuation Coefficient",
  derivation SCT 373098007 "Mean" (or SCT 386136009 "Standard Deviation"); which of
  the published estimates it is (DL-parenchymal, DL-volumetric, DL-axial) is carried as
  the measurement method, in our own private coding scheme ``99LIVERFAT`` (declared in
  each SR's Coding Scheme Identification Sequence), because no standard code exists.
- **Summary report title.** The title names the document and its outcome, so that a viewer
  that shows the report as text (OHIF) or a PACS that lists it by title opens on the grade:
  ``99LIVERFAT SUMMARY-MODSEV`` "Liver attenuation: moderate-to-severe steatosis",
  ``SUMMARY-NOTSHOWN`` "Liver attenuation: moderate-to-severe steatosis not shown",
  ``SUMMARY-UNGRADED`` "Liver attenuation: not graded". TID 1500 row 1 takes its title from
  DCID 7021 "Measurement Report Document Title", which is *extensible* (PS3.16, version
  20141110), so 126000 is not required; and the title is the only item that TID 1500 puts
  before the language and the observer context (with the device's UID), so it is the only place
  where the grade can come first. Its only general member, DCM 126000 "Imaging Measurement
  Report", makes OHIF treat the document as editable measurements: it shows no TEXT or CODE
  item and crashes on a group without an image region (see ``sr.py``); 126001-126003 are for
  oncology, DCE-MR and PET. The LOINC titles of CID 7000 ("Diagnostic Imaging Report",
  "CT Chest Report") name a physician's signed diagnostic report, which this machine result is
  not. So the title is ours, in our declared scheme; with PreliminaryFlag PRELIMINARY and
  VerificationFlag UNVERIFIED (``sr.py``).
- **Graded value with replaced ROIs.** When a seed ROI failed its checks and was
  replaced, the graded value is not the published DL-parenchymal; it is coded with
  method ``99LIVERFAT DL-PAR-REPLACED`` beside the seed-exact DL-parenchymal.
- **ROI segments.** SCT 309825002 "Spatial and Relational Concept" / NCIt C94970
  "Reference Region" (CID 7150 / CID 7196), anatomic region Liver: a sampling region
  inside the liver, not an anatomical structure of its own.

References
----------
PS3.16 CID 7000, 7021, 7150, 7151, 7162, 7181, 7196, 7464, 7469, 218, 226, 100;
TID 1500, 1501, 1410, 1411, 300, 310, 311.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

# --- anatomy and segment properties (SEG, finding sites) ---------------------------
LIVER = CodedConcept.from_code(codes.SCT.Liver)
ANATOMICAL_STRUCTURE = CodedConcept.from_code(codes.cid7150.AnatomicalStructure)
SPATIAL_AND_RELATIONAL_CONCEPT = CodedConcept.from_code(codes.cid7150.SpatialAndRelationalConcept)
REFERENCE_REGION = CodedConcept.from_code(codes.cid7196.ReferenceRegion)

# --- algorithm families (AlgorithmIdentificationSequence, TID 4019) ----------------
ARTIFICIAL_INTELLIGENCE = CodedConcept.from_code(codes.cid7162.ArtificialIntelligence)
MORPHOLOGICAL_OPERATIONS = CodedConcept.from_code(codes.cid7162.MorphologicalOperations)

# --- measurements (TID 300) ---------------------------------------------------------
ATTENUATION_COEFFICIENT = CodedConcept.from_code(codes.DCM.AttenuationCoefficient)
THRESHOLD_ATTENUATION_COEFFICIENT = CodedConcept.from_code(codes.DCM.ThresholdAttenuationCoefficient)
AREA = CodedConcept.from_code(codes.SCT.Area)
VOLUME = CodedConcept.from_code(codes.SCT.Volume)
MEAN = CodedConcept.from_code(codes.SCT.Mean)
STANDARD_DEVIATION = CodedConcept.from_code(codes.SCT.StandardDeviation)

# --- units (UCUM, CID 7181) ---------------------------------------------------------
HOUNSFIELD_UNIT = CodedConcept.from_code(codes.UCUM.HounsfieldUnit)
SQUARE_MILLIMETER = CodedConcept.from_code(codes.UCUM.SquareMillimeter)
MILLILITER = CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")

# --- the grade (qualitative evaluations) --------------------------------------------
STEATOSIS_OF_LIVER = CodedConcept(value="197321007", scheme_designator="SCT", meaning="Steatosis of liver")
PRESENT = CodedConcept.from_code(codes.SCT.Present)
NOT_DETECTED = CodedConcept(value="260415000", scheme_designator="SCT", meaning="Not detected")
UNDETERMINED = CodedConcept.from_code(codes.SCT.Undetermined)
CERTAINTY_OF_FINDING = CodedConcept.from_code(codes.DCM.CertaintyOfFinding)
EQUIVOCAL = CodedConcept.from_code(codes.SCT.Equivocal)

# --- free-text items ------------------------------------------------------------------
SUMMARY = CodedConcept.from_code(codes.DCM.Summary)
COMMENT = CodedConcept.from_code(codes.DCM.Comment)

# --- report frame ---------------------------------------------------------------------
IMAGING_MEASUREMENT_REPORT = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
CT_UNSPECIFIED_BODY_REGION = CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)

# --- our private coding scheme: which published liver-attenuation estimate ----------
LIVERFAT_SCHEME = "99LIVERFAT"
LIVERFAT_SCHEME_NAME = "liverfat measurement methods"
# the summary SR's title, by outcome (see the module docstring)
SUMMARY_MODERATE_TO_SEVERE = CodedConcept(
    value="SUMMARY-MODSEV", scheme_designator=LIVERFAT_SCHEME, meaning="Liver attenuation: moderate-to-severe steatosis"
)
SUMMARY_NOT_SHOWN = CodedConcept(
    value="SUMMARY-NOTSHOWN",
    scheme_designator=LIVERFAT_SCHEME,
    meaning="Liver attenuation: moderate-to-severe steatosis not shown",
)
SUMMARY_NOT_GRADED = CodedConcept(
    value="SUMMARY-UNGRADED", scheme_designator=LIVERFAT_SCHEME, meaning="Liver attenuation: not graded"
)
# the question the grade answers (see the module docstring)
MODERATE_TO_SEVERE_STEATOSIS = CodedConcept(
    value="MODSEV-STEATOSIS", scheme_designator=LIVERFAT_SCHEME, meaning="Moderate-to-severe hepatic steatosis"
)
DL_PARENCHYMAL = CodedConcept(
    value="DL-PARENCHYMAL", scheme_designator=LIVERFAT_SCHEME, meaning="DL-parenchymal (mean of three ROIs)"
)
DL_VOLUMETRIC = CodedConcept(
    value="DL-VOLUMETRIC", scheme_designator=LIVERFAT_SCHEME, meaning="DL-volumetric (mean over liver mask)"
)
DL_AXIAL = CodedConcept(
    value="DL-AXIAL", scheme_designator=LIVERFAT_SCHEME, meaning="DL-axial (mean over largest liver slice)"
)
DL_PARENCHYMAL_REPLACED = CodedConcept(
    value="DL-PAR-REPLACED",
    scheme_designator=LIVERFAT_SCHEME,
    meaning="DL-parenchymal with replaced ROIs (graded value)",
)
