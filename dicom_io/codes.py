"""Every coded concept the DICOM writers use, as a named constant.

The builders in ``seg.py``, ``sr.py`` and ``keyimage.py`` never spell a code value
themselves; they import it from here, so a reviewer can check the vocabulary in one place.

Choices that are ours (the standard offers more than one way):

- **Grade.** The method answers one binary question: is there *moderate-to-severe*
  hepatic steatosis (DL-parenchymal attenuation below the threshold)? It cannot tell
  "no steatosis" from "mild steatosis", so neither SCT "Mild" nor SCT "Absent" alone
  would be truthful for the negative answer. We post-coordinate the question instead:
  the qualitative evaluation's concept name is SCT 197321007 "Steatosis of liver",
  qualified (HAS CONCEPT MOD) by SCT 246112005 "Severity" = SCT 371924009 "Moderate to
  severe"; its value is SCT 52101004 "Present" or SCT 272519000 "Absent", or
  SCT 373068000 "Undetermined" when the grade is withheld. 197321007 is the SNOMED CT
  disorder "Steatosis of liver" (synonym "Fatty liver"); it is not in pydicom's code
  dictionary, so it is spelled out here.
- **Threshold.** DCM 112032 "Threshold Attenuation Coefficient", in [hnsf'U].
- **Which mean.** Every liver attenuation is DCM 112031 "Attenuation Coefficient",
  derivation SCT 373098007 "Mean" (or SCT 386136009 "Standard Deviation"); which of
  the published estimates it is (DL-parenchymal, DL-volumetric, DL-axial) is carried as
  the measurement method, in our own private coding scheme ``99LIVERFAT`` (declared in
  each SR's Coding Scheme Identification Sequence), because no standard code exists.
- **Summary report title.** LN 18748-4 "Diagnostic Imaging Report" (CID 7000) for the
  summary SR, not DCM 126000: TID 1500's title comes from CID 7021, which is extensible,
  and OHIF renders a report with any title but 126000 as readable text (see ``sr.py``).
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

# --- the grade (qualitative evaluation) ---------------------------------------------
STEATOSIS_OF_LIVER = CodedConcept(value="197321007", scheme_designator="SCT", meaning="Steatosis of liver")
SEVERITY = CodedConcept.from_code(codes.SCT.Severity)
MODERATE_TO_SEVERE = CodedConcept.from_code(codes.SCT.ModerateToSevere)
PRESENT = CodedConcept.from_code(codes.SCT.Present)
ABSENT = CodedConcept.from_code(codes.SCT.Absent)
UNDETERMINED = CodedConcept.from_code(codes.SCT.Undetermined)

# --- free-text items ------------------------------------------------------------------
SUMMARY = CodedConcept.from_code(codes.DCM.Summary)
COMMENT = CodedConcept.from_code(codes.DCM.Comment)

# --- report frame ---------------------------------------------------------------------
IMAGING_MEASUREMENT_REPORT = CodedConcept.from_code(codes.DCM.ImagingMeasurementReport)
DIAGNOSTIC_IMAGING_REPORT = CodedConcept.from_code(codes.LN.DiagnosticImagingReport)
CT_UNSPECIFIED_BODY_REGION = CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)

# --- our private coding scheme: which published liver-attenuation estimate ----------
LIVERFAT_SCHEME = "99LIVERFAT"
LIVERFAT_SCHEME_NAME = "liverfat measurement methods"
DL_PARENCHYMAL = CodedConcept(
    value="DL-PARENCHYMAL", scheme_designator=LIVERFAT_SCHEME, meaning="DL-parenchymal (mean of three ROIs)"
)
DL_VOLUMETRIC = CodedConcept(
    value="DL-VOLUMETRIC", scheme_designator=LIVERFAT_SCHEME, meaning="DL-volumetric (mean over liver mask)"
)
DL_AXIAL = CodedConcept(
    value="DL-AXIAL", scheme_designator=LIVERFAT_SCHEME, meaning="DL-axial (mean over largest liver slice)"
)
