"""Header-only eligibility: is a series an unenhanced, axial, original chest CT?

The method (DL-parenchymal, < 40 HU) was built on unenhanced chest CT. Contrast raises liver
attenuation, so an enhanced or abdominal study graded as steatosis is a wrong answer, whereas a
series rejected here only costs a missed opportunity. Every rule therefore errs on the side of
rejection, and :func:`check_eligibility` reports every reason it finds, not only the first.

Decisions (thresholds, keyword tables and the switches named here live in :class:`EligibilityPolicy`):

- **Not a CT image** (Modality, or SOP Class from the dataset or else its file meta): the other
  rules do not apply to such objects, so the check stops there.
- **Image Type**: value 1 must be ORIGINAL; value 2 SECONDARY is accepted (LIDC-IDRI, the
  method's own training data, is ORIGINAL/SECONDARY/AXIAL after re-export). Localizers and
  reformats/projections (MPR, MIP, REFORMATTED, ...) in Image Type or SeriesDescription reject.
- **Axial**: the normal of ImageOrientationPatient (or the Enhanced CT functional groups) lies
  within 15 degrees of the S/I axis; moderate gantry tilt is left to the series reader.
- **Chest, not abdominal**: any abdominal region word (ABD, PELVIS, CAP, COLONOSCOPY, WHOLEBODY,
  ...) in BodyPartExamined, AnatomicRegionSequence or a description rejects, even next to CHEST
  (chest-abdomen studies are out of scope). A missing BodyPartExamined is fine when a
  description says chest. A header that names another region (HEAD, NECK, SPINE, KNEE, ...; any
  BodyPartExamined or AnatomicRegionSequence value counts) and none says chest rejects as
  NOT_CHEST; ``require_chest_evidence``.
- **Silent headers** (no header names any body part or region, as in much anonymised research
  data, e.g. 3D-IRCADb): not rejected from the headers. The decision carries a pending
  REGION_FROM_IMAGE finding instead, and whoever loads the pixels must decide from the image
  whether the scan shows the chest and the liver dome (``liverfat.inference.image_checks``);
  ``region_from_image``. With ``region_from_image = false`` such a series is NOT_CHEST as before.
- **Contrast**: any sign of contrast rejects, whichever header it comes from; an explicit
  "without contrast" elsewhere never outweighs it, and an empty contrast tag proves nothing.
  Descriptions are tokenised (so PE never matches PELVIS, nor CE CENTER) and negations consume
  the contrast words that follow them ("WO IV CONT" is not contrast). With-and-without
  wording (WWO, W/WO, W&WO) marks a study with contrast phases: one of its series is accepted
  only when its own SeriesDescription says unenhanced and nothing else (no contrast tag, no
  contrast word) says otherwise, because the pre-contrast series is the only unenhanced one and
  only its series-level label says which it is; ``accept_unenhanced_series_of_mixed_study``.
- **Oral or rectal contrast only** (no IV) is accepted: it stays in the bowel and does not enhance
  the liver parenchyma. ORAL/RECTAL & IV is contrast, and so is any other non-empty agent
  ("APPLIED", "OMNIPAQUE", even with route ORAL: the same agents are given intravenously);
  ``oral_contrast_is_contrast``.
- **No contrast information at all** is accepted: headers cannot prove a scan is unenhanced.
  The image-based check (IMAGE_SUGGESTS_CONTRAST) is the second line of defence.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from functools import lru_cache
from typing import Any

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from liverfat.errors import Finding, Reason

logger = logging.getLogger(__name__)

# --- keyword tables (policy defaults); phrases are tokenised like the header text ---------------
CONTRAST_NOUNS = (
    "CONTRAST", "CONT", "CON", "C", "CM", "KM", "MDC", "CONTRASTE", "KONTRAST", "ENHANCED", "ENHANCEMENT",
    "ENH", "AGENT", "DYE", "MEDIA", "MEDIUM", "INJECTION", "INJ", "ONLY")
CONTRAST_SCOPE_WORDS = (*CONTRAST_NOUNS, "IV", "I", "V", "INTRAVENOUS", "ORAL", "PO", "RECTAL", "AND", "OR")
MIXED_CONTRAST_KEYWORDS = (
    "WWO", "W WO", "WO W", "W W/O", "W/O W", "W AND WO", "WO AND W", "W AND W/O", "W/O AND W",
    "WITH AND WITHOUT", "WITHOUT AND WITH", "WITH WITHOUT", "WITHOUT WITH", "PRE AND POST", "PRE POST",
    "MULTIPHASE", "MULTIPHASIC", "BIPHASIC", "TRIPHASIC", "DUAL PHASE", "TRIPLE PHASE", "VNC",
    "VIRTUAL NON CONTRAST", "VIRTUAL NONCONTRAST", "VIRTUAL UNENHANCED")
NO_CONTRAST_KEYWORDS = (
    "WO", "W/O", "WITHOUT", "NON CON", "NON CONT", "NON CONTRAST", "NON ENHANCED", "NON IV", "NONCON",
    "NONCONTRAST", "NONENHANCED", "UNENHANCED", "NO CON", "NO CONT", "NO CONTRAST", "NO IV", "NO ORAL",
    "NC", "NCCT", "PLAIN", "NATIVE", "NATIV", "-C", "C-", "PRE CONTRAST", "PRECONTRAST", "PRE CON", "SANS",
    "OHNE", "SIN", "SENZA")
ORAL_CONTRAST_KEYWORDS = (
    "ORAL", "W ORAL", "WITH ORAL", "PO", "W PO", "PER OS", "RECTAL", "ENTERIC", "BARIUM", "GASTROGRAFIN",
    "GASTROGRAPHIN")
CONTRAST_KEYWORDS = (
    "CONTRAST", "CONT", "CON", "CONTRASTE", "KONTRAST", "KM", "MDC", "W", "W IV", "I V", "WITH IV", "W CON", "W CONT",
    "W CONTRAST", "WITH CON", "WITH CONT", "WITH CONTRAST", "MIT KM", "IV", "INTRAVENOUS", "CE", "CECT",
    "C+", "+C", "ENHANCED", "ENHANCEMENT", "ENH", "INJECTION", "INJ", "INJECTE", "NON IONIC", "IONIC",
    "NONIONIC", "IODINATED", "ANGIO", "ANGIOGRAM", "ANGIOGRAPHY", "CTA", "CTPA", "CTANGIO", "PE",
    "EMBOLISM", "ARTERIAL", "PORTAL", "VENOUS", "PV", "PVP", "DELAYED", "DELAY", "NEPHROGRAPHIC",
    "EXCRETORY", "EQUILIBRIUM", "PERFUSION", "BOLUS", "SMARTPREP", "SURESTART", "CAREBOLUS", "MONITORING",
    "PREMONITORING", "OMNIPAQUE", "ISOVUE", "VISIPAQUE", "ULTRAVIST", "IOMERON", "OPTIRAY", "IOPAMIDOL",
    "IOHEXOL", "IODIXANOL", "IOPROMIDE", "IOVERSOL", "IOMEPROL")
CHEST_KEYWORDS = (
    "CHEST", "THORAX", "THORACIC", "TORAX", "TORACE", "THX", "LUNG", "LUNGS", "PULMONARY", "PULMO", "HRCT",
    "LDCT", "MEDIASTINUM", "MEDIASTINAL")
ABDOMINAL_KEYWORDS = (
    "ABD", "ABDO", "ABDOMEN", "ABDOMINAL", "ABDOMINOPELVIC", "ABDPEL", "ADDOME", "PELVIS", "PEL", "PELV",
    "PELVIC", "BECKEN", "BASSIN", "CAP", "TAP", "LIVER", "HEPATIC", "LEBER", "FOIE", "PANCREAS",
    "PANCREATIC", "KIDNEY", "KIDNEYS", "RENAL", "ADRENAL", "ADRENALS", "UROGRAM", "UROGRAPHY", "KUB",
    "COLON", "COLONOGRAPHY", "COLONOSCOPY", "ENTEROGRAPHY", "ENTEROCLYSIS", "BOWEL", "APPENDIX", "SPLEEN",
    "GALLBLADDER", "BILIARY", "MESENTERIC", "WHOLEBODY", "WHOLE BODY", "PARTIALBODY", "TOTAL BODY",
    "TOTALBODY", "TORSO", "TRUNK")
# Regions that are neither chest nor abdomen: a header naming one of them (and not chest) rejects.
OTHER_REGION_KEYWORDS = (
    "HEAD", "BRAIN", "SKULL", "CRANIAL", "CRANIUM", "NECK", "NK", "SINUS", "SINUSES", "FACE", "FACIAL",
    "ORBIT", "ORBITS", "TEMPORAL BONE", "PETROUS", "MANDIBLE", "MAXILLOFACIAL", "DENTAL", "SPINE", "CSPINE",
    "TSPINE", "LSPINE", "CERVICAL", "LUMBAR", "SACRUM", "COCCYX", "SHOULDER", "ARM", "HUMERUS", "ELBOW",
    "FOREARM", "WRIST", "HAND", "HIP", "FEMUR", "THIGH", "KNEE", "LEG", "TIBIA", "ANKLE", "FOOT",
    "EXTREMITY", "EXTREMITIES", "CARDIAC", "HEART", "CORONARY", "CALCIUM SCORE", "KOPF", "SCHADEL", "HALS",
    "TETE", "CRANE", "COU", "CABEZA", "CUELLO", "TESTA", "COLLO")
LOCALIZER_KEYWORDS = (
    "LOCALIZER", "LOCALISER", "SCOUT", "SCOUTVIEW", "TOPOGRAM", "SURVIEW", "SCANOGRAM", "SCANOSCOPE")
DERIVED_KEYWORDS = (
    "MPR", "MIP", "MINIP", "REFORMATTED", "REFORMAT", "PROJECTION", "CURVED", "CPR", "VR", "VRT", "SSD",
    "3D")
NO_AGENT_VALUES = ("NONE", "NO", "N/A", "NA", "NIL", "0")  # whole ContrastBolusAgent/Route values
DESCRIPTION_TAGS = ("StudyDescription", "SeriesDescription", "ProtocolName",
                    "PerformedProcedureStepDescription", "RequestedProcedureDescription")
# Contrast administration details whose non-zero value says an agent was given (route unknown).
_ADMINISTRATION_TAGS = ("ContrastBolusVolume", "ContrastBolusTotalDose", "ContrastFlowRate",
                        "ContrastBolusStartTime")
_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


# --- text matching --------------------------------------------------------------------------------
_TOKEN = re.compile(r"[A-Z0-9]+|[+/&-]")
_PUNCTUATION = frozenset("+/&-")


class _Kind(Enum):
    MIXED = "with and without contrast"
    NONE = "no contrast"
    ORAL = "oral or rectal contrast"
    CONTRAST = "contrast"


@lru_cache(maxsize=8192)
def _tokens(text: str) -> tuple[str, ...]:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().upper()
    return tuple(_TOKEN.findall(plain))


def _match(tokens: tuple[str, ...], start: int, phrase: tuple[str, ...], taken: list[bool]) -> int:
    """End index of ``phrase`` matched at ``start`` (punctuation between its words skipped), or -1."""
    j = start
    for k, word in enumerate(phrase):
        while k and j < len(tokens) and tokens[j] != word and tokens[j] in _PUNCTUATION:
            j += 1
        if j >= len(tokens) or tokens[j] != word or taken[j]:
            return -1
        j += 1
    return j


def _find(tokens: tuple[str, ...], phrases: tuple[str, ...], scope: tuple[str, ...],
          taken: list[bool]) -> list[str]:
    """Phrases found among the tokens not yet taken, each extended over following scope words."""
    ordered = sorted({_tokens(p) for p in phrases}, key=len, reverse=True)
    hits, i = [], 0
    while i < len(tokens):
        end = next((e for p in ordered if (e := _match(tokens, i, p, taken)) > i), -1)
        if end < 0:
            i += 1
            continue
        last = j = end
        while j < len(tokens) and not taken[j] and (tokens[j] in scope or tokens[j] in _PUNCTUATION):
            j += 1
            last = j if tokens[j - 1] in scope else last
        taken[i:last] = [True] * (last - i)
        hits.append(re.sub(r" ?([+/&-]) ?", r"\1", " ".join(tokens[i:last])))
        i = last
    return hits


def _contrast_phrases(text: str, policy: EligibilityPolicy) -> dict[_Kind, list[str]]:
    """Contrast statements in ``text``: with-and-without first, then negations, oral, contrast."""
    tokens = _tokens(text)
    taken = [False] * len(tokens)
    passes = ((_Kind.MIXED, policy.mixed_contrast_keywords, policy.contrast_scope_words),
              (_Kind.NONE, policy.no_contrast_keywords, policy.contrast_scope_words),
              (_Kind.ORAL, policy.oral_contrast_keywords, policy.oral_scope_words),
              (_Kind.CONTRAST, policy.contrast_keywords, policy.contrast_scope_words))
    return {kind: _find(tokens, words, scope, taken) for kind, words, scope in passes}


def _words(text: str, phrases: tuple[str, ...]) -> list[str]:
    tokens = _tokens(text)
    return _find(tokens, phrases, (), [False] * len(tokens))


@dataclass(frozen=True)
class EligibilityPolicy:
    """Thresholds and keyword tables; the defaults are the product's policy.

    Keywords are phrases matched as whole tokens on upper-cased, accent-free text in which
    punctuation other than ``+ / & -`` separates tokens; punctuation between the words of a
    phrase is ignored, so "W WO" also matches "W/WO" and "W&WO".
    """

    max_slice_thickness_mm: float = 5.0
    max_axial_deviation_deg: float = 15.0
    sop_class_uids: tuple[str, ...] = (str(CTImageStorage), str(EnhancedCTImageStorage))
    modalities: tuple[str, ...] = ("CT",)
    original_image_type_values: tuple[str, ...] = ("ORIGINAL",)
    derived_keywords: tuple[str, ...] = DERIVED_KEYWORDS
    localizer_keywords: tuple[str, ...] = LOCALIZER_KEYWORDS
    description_tags: tuple[str, ...] = DESCRIPTION_TAGS
    chest_keywords: tuple[str, ...] = CHEST_KEYWORDS
    abdominal_keywords: tuple[str, ...] = ABDOMINAL_KEYWORDS
    other_region_keywords: tuple[str, ...] = OTHER_REGION_KEYWORDS
    require_chest_evidence: bool = True
    region_from_image: bool = True
    contrast_keywords: tuple[str, ...] = CONTRAST_KEYWORDS
    mixed_contrast_keywords: tuple[str, ...] = MIXED_CONTRAST_KEYWORDS
    no_contrast_keywords: tuple[str, ...] = NO_CONTRAST_KEYWORDS
    oral_contrast_keywords: tuple[str, ...] = ORAL_CONTRAST_KEYWORDS
    no_agent_values: tuple[str, ...] = NO_AGENT_VALUES
    contrast_scope_words: tuple[str, ...] = CONTRAST_SCOPE_WORDS
    oral_scope_words: tuple[str, ...] = CONTRAST_NOUNS
    oral_contrast_is_contrast: bool = False
    accept_unenhanced_series_of_mixed_study: bool = True

    def __post_init__(self) -> None:
        for name in ("max_slice_thickness_mm", "max_axial_deviation_deg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"eligibility setting {name} must be > 0, got {getattr(self, name)!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and not all(
                    isinstance(v, str) and set(_tokens(v)) - _PUNCTUATION for v in value):
                raise ValueError(f"eligibility setting {f.name} must hold non-empty words, got {value!r}")
        unknown = [t for t in self.description_tags if tag_for_keyword(t) is None]
        if unknown:
            raise ValueError(f"eligibility setting description_tags: {unknown} are not DICOM keywords")

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> EligibilityPolicy:
        """A policy from a configuration table; lists become tuples, unknown keys are refused."""
        known = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown eligibility setting(s) {', '.join(unknown)}; "
                             f"known settings: {', '.join(known)}")
        converted: dict[str, Any] = {}
        for name, value in values.items():
            default = known[name]
            if isinstance(default, bool) and isinstance(value, bool):
                converted[name] = value
            elif (isinstance(default, float) and isinstance(value, int | float)
                  and not isinstance(value, bool)):
                converted[name] = float(value)
            elif (isinstance(default, tuple) and isinstance(value, list | tuple)
                  and all(isinstance(v, str) for v in value)):
                converted[name] = tuple(value)
            else:
                raise ValueError(f"eligibility setting {name}: expected a value like {default!r}, "
                                 f"got {value!r}")
        return cls(**converted)


@dataclass(frozen=True)
class Eligibility:
    """The decision; ``findings`` lists every reason for rejection (empty when eligible).

    ``pending`` lists what the headers could not decide and the image must: today only
    ``REGION_FROM_IMAGE`` (no header names a body region). An eligible decision with a pending
    finding is eligible *from the headers*; the caller that loads the pixels settles it.
    """

    eligible: bool
    findings: tuple[Finding, ...]
    pending: tuple[Finding, ...] = ()

    @property
    def codes(self) -> frozenset[Reason]:
        return frozenset(f.code for f in self.findings)

    @property
    def region_from_image(self) -> bool:
        """True when the body region is still to be confirmed from the image."""
        return any(f.code is Reason.REGION_FROM_IMAGE for f in self.pending)

    def to_json(self) -> dict[str, object]:
        return {"eligible": self.eligible, "findings": [f.to_json() for f in self.findings],
                "pending": [f.to_json() for f in self.pending]}


def check_eligibility(headers: Sequence[Dataset],
                      policy: EligibilityPolicy = EligibilityPolicy()) -> Eligibility:
    """Decide from the headers of all instances of one series (pixel data not needed)."""
    if not headers:
        raise ValueError("check_eligibility needs the headers of at least one instance")
    findings = _ct_findings(headers, policy)
    pending: list[Finding] = []
    if not any(f.code is Reason.NOT_CT for f in findings):
        anatomy = _anatomy_findings(headers, policy)
        pending = [f for f in anatomy if f.code is Reason.REGION_FROM_IMAGE]
        findings += (_image_type_findings(headers, policy) + _orientation_findings(headers, policy)
                     + _thickness_findings(headers, policy) + [f for f in anatomy if f not in pending]
                     + _contrast_findings(headers, policy))
    result = Eligibility(eligible=not findings, findings=tuple(findings), pending=tuple(pending))
    logger.debug("eligibility of %s: %s", headers[0].get("SeriesInstanceUID"), result.to_json())
    return result


# --- header access --------------------------------------------------------------------------------
def _where(keyword: str) -> str:
    return f"see {Tag(keyword)}"


def _is_empty(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, Sequence) and not isinstance(value, str)
                                            and len(value) == 0)


def _texts(headers: Sequence[Dataset], keyword: str) -> list[str]:
    """Distinct non-empty values of a text attribute over the series, multi-values joined."""
    found: dict[str, None] = {}
    for ds in headers:
        value = ds.get(keyword)
        if not _is_empty(value):
            found["\\".join(map(str, value)) if isinstance(value, Sequence) and not isinstance(value, str)
                  else str(value)] = None
    return list(found)


def _items(ds: Dataset, sequence: str) -> Iterator[Dataset]:
    """Items of ``sequence`` at top level and inside the Enhanced CT functional groups."""
    yield from ds.get(sequence) or ()
    for groups in _FUNCTIONAL_GROUPS:
        for group in ds.get(groups) or ():
            yield from group.get(sequence) or ()


def _values(ds: Dataset, keyword: str, sequence: str) -> list[Any]:
    """Non-empty values of ``keyword`` at top level or in ``sequence`` items (Enhanced CT)."""
    values = [ds.get(keyword), *(item.get(keyword) for item in _items(ds, sequence))]
    return [v for v in values if not _is_empty(v)]


def _code_meanings(headers: Sequence[Dataset], sequence: str, nested: str) -> list[str]:
    """Distinct texts of the coded items of ``sequence``, one per item (its own and nested meanings)."""
    texts: dict[str, None] = {}
    for ds in headers:
        for item in ds.get(sequence) or ():
            codes = (item, *(item.get(nested) or ()))
            texts[" ".join(str(c.CodeMeaning) for c in codes if c.get("CodeMeaning")) or
                  f"item {item.get('CodeValue', '')} without CodeMeaning"] = None
    return list(texts)


# --- the rules --------------------------------------------------------------------------------------
def _ct_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    findings = []
    sop_classes = {str(ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                                        "MediaStorageSOPClassUID", "") or "")
                   for ds in headers}
    for label, seen, allowed in (("SOPClassUID", sop_classes, policy.sop_class_uids),
                                 ("Modality", {str(ds.get("Modality") or "") for ds in headers},
                                  policy.modalities)):
        if "" in seen:
            findings.append(Finding(Reason.MISSING_ATTRIBUTE, f"{label} is absent or empty, "
                                    f"expected one of {', '.join(allowed)}, {_where(label)}"))
        for value in sorted(seen - {""} - set(allowed)):
            findings.append(Finding(Reason.NOT_CT, f"{label} '{value}' is not a CT image "
                                    f"(expected one of {', '.join(allowed)}), {_where(label)}"))
    return findings


def _image_type_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    image_types = _texts(headers, "ImageType")
    if not image_types:
        return [Finding(Reason.MISSING_ATTRIBUTE, f"ImageType is absent, cannot tell an original "
                        f"axial image from a localizer or reformat, {_where('ImageType')}")]
    findings = []
    for image_type in image_types:
        first = image_type.split("\\")[0].strip().upper()
        if first not in policy.original_image_type_values:
            findings.append(Finding(Reason.DERIVED_IMAGE, f"ImageType '{image_type}' value 1 is "
                                    f"'{first}', expected {' or '.join(policy.original_image_type_values)}, "
                                    f"{_where('ImageType')}"))
    for keyword in ("ImageType", "SeriesDescription", "ScanOptions"):
        for text in _texts(headers, keyword):
            tail = text.split("\\", 1)[-1] if keyword == "ImageType" else text
            for reason, words, what in ((Reason.LOCALIZER, policy.localizer_keywords, "a localizer"),
                                        (Reason.DERIVED_IMAGE, policy.derived_keywords,
                                         "a reformat or projection")):
                if hits := _words(tail, words):
                    findings.append(Finding(reason, f"{keyword} '{text}' marks {what} "
                                            f"({', '.join(hits)}), {_where(keyword)}"))
    return findings


def _orientation_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    orientations = {tuple(float(x) for x in v) for ds in headers
                    for v in _values(ds, "ImageOrientationPatient", "PlaneOrientationSequence")}
    if not orientations:
        return [Finding(Reason.MISSING_ATTRIBUTE, "ImageOrientationPatient is absent (also from the "
                        f"functional groups), cannot tell the plane, {_where('ImageOrientationPatient')}")]
    findings = []
    for iop in sorted(orientations):
        row, col = (iop[:3], iop[3:]) if len(iop) == 6 else ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
                  row[0] * col[1] - row[1] * col[0])
        length = math.hypot(*normal)
        angle = math.degrees(math.acos(min(1.0, abs(normal[2]) / length))) if length > 0 else 90.0
        if angle > policy.max_axial_deviation_deg:
            plane = ("sagittal", "coronal", "axial")[max(range(3), key=lambda a: abs(normal[a]))]
            findings.append(Finding(Reason.NOT_AXIAL, f"ImageOrientationPatient "
                                    f"{[round(x, 3) for x in iop]} is {plane}-like: its normal is "
                                    f"{angle:.0f} deg from the S/I axis, expected within "
                                    f"{policy.max_axial_deviation_deg:g} deg, {_where('ImageOrientationPatient')}"))
    return findings


def _thickness_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    per_header = [_values(ds, "SliceThickness", "PixelMeasuresSequence") for ds in headers]
    raw = [v for values in per_header for v in values]
    try:
        thickness = max(float(v) for v in raw) if all(per_header) else None
    except (TypeError, ValueError):
        thickness = None
    if thickness is None:
        missing = sum(not values for values in per_header)
        detail = f"absent or empty in {missing} of {len(headers)} instances" if missing else f"unreadable {raw!r}"
        return [Finding(Reason.MISSING_ATTRIBUTE, f"SliceThickness is {detail}, cannot check the "
                        f"{policy.max_slice_thickness_mm:g} mm limit, {_where('SliceThickness')}")]
    if thickness > policy.max_slice_thickness_mm + 1e-6:
        return [Finding(Reason.SLICE_TOO_THICK, f"SliceThickness {thickness:g} mm exceeds the "
                        f"{policy.max_slice_thickness_mm:g} mm limit, {_where('SliceThickness')}")]
    return []


def _anatomy_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    """ABDOMINAL, NOT_CHEST, or (headers silent on the region) a pending REGION_FROM_IMAGE."""
    sources = [(k, t) for k in ("BodyPartExamined", *policy.description_tags) for t in _texts(headers, k)]
    sources += [("AnatomicRegionSequence", m) for m in _code_meanings(
        headers, "AnatomicRegionSequence", "AnatomicRegionModifierSequence")]
    findings = [Finding(Reason.ABDOMINAL, f"{keyword} '{text}' names a region that includes the "
                        f"abdomen ({', '.join(hits)}), {_where(keyword)}")
                for keyword, text in sources if (hits := _words(text, policy.abdominal_keywords))]
    chest = any(_words(text, policy.chest_keywords) for _, text in sources)
    if findings or chest or not policy.require_chest_evidence:
        return findings
    seen = "; ".join(f"{k} '{t}'" for k, t in sources) or "none of them is present"
    tags = ", ".join(str(Tag(k)) for k in ("BodyPartExamined", "AnatomicRegionSequence", *policy.description_tags))
    if policy.region_from_image and not _names_a_region(sources, policy):
        return [Finding(Reason.REGION_FROM_IMAGE, f"no header names a body part or region ({seen}; see "
                        f"{tags}): the image must show the lungs and the liver dome")]
    return [Finding(Reason.NOT_CHEST, f"no body part or description says chest "
                    f"(expected one of {', '.join(policy.chest_keywords[:4])}, ...): {seen}; see {tags}")]


def _names_a_region(sources: Sequence[tuple[str, str]], policy: EligibilityPolicy) -> bool:
    """True when a header names some body region: any BodyPartExamined or AnatomicRegionSequence
    value, or a description holding one of ``other_region_keywords``."""
    return any(keyword in ("BodyPartExamined", "AnatomicRegionSequence")
               or _words(text, policy.other_region_keywords) for keyword, text in sources)


def _contrast_findings(headers: Sequence[Dataset], policy: EligibilityPolicy) -> list[Finding]:
    """Contrast from the contrast tags and the descriptions; see the module docstring."""
    contrast: list[Finding] = []
    mixed: list[Finding] = []
    oral: list[Finding] = []
    oral_tag = series_unenhanced = False
    texts = [(k, t) for k in ("ContrastBolusAgent", "ContrastBolusRoute", "ImageType",
                              *policy.description_tags) for t in _texts(headers, k)]
    administered = {str(v).upper() for ds in headers for v in _values(
        ds, "ContrastBolusAgentAdministered", "ContrastBolusUsageSequence")}
    if administered != {"NO"}:  # Enhanced CT: frames may say the defined agent was not given
        texts += [("ContrastBolusAgentSequence", m) for m in _code_meanings(
            headers, "ContrastBolusAgentSequence", "AdministrationRouteCodeSequence")]
    no_agent = {_tokens(v) for v in policy.no_agent_values}
    for keyword, text in texts:
        is_tag = keyword.startswith("Contrast")
        if is_tag and _tokens(text) in no_agent:
            continue
        found = _contrast_phrases(text, policy)
        if keyword == "SeriesDescription":
            series_unenhanced = bool(found[_Kind.NONE]) and not found[_Kind.MIXED] and not found[_Kind.CONTRAST]
        said = f"{keyword} '{text}'"
        if found[_Kind.MIXED]:
            mixed.append(Finding(Reason.CONTRAST, f"{said} describes a study with and without contrast "
                                 f"({', '.join(found[_Kind.MIXED])}), {_where(keyword)}"))
        if found[_Kind.CONTRAST] or (is_tag and not any(found.values())):
            what = ", ".join(found[_Kind.CONTRAST]) or "a non-empty agent or route"
            contrast.append(Finding(Reason.CONTRAST, f"{said} mentions contrast ({what}), {_where(keyword)}"))
        elif found[_Kind.ORAL]:
            oral_tag = oral_tag or is_tag
            oral.append(Finding(Reason.CONTRAST, f"{said} mentions oral or rectal contrast "
                                f"({', '.join(found[_Kind.ORAL])}), {_where(keyword)}"))
    for keyword in _ADMINISTRATION_TAGS:
        for text in _texts(headers, keyword):
            if _nonzero(text) and not oral_tag:
                contrast.append(Finding(Reason.CONTRAST, f"{keyword} '{text}' says a contrast agent "
                                        f"was given, {_where(keyword)}"))
    if "YES" in administered:
        contrast.append(Finding(Reason.CONTRAST, "ContrastBolusAgentAdministered (0018,9342) is 'YES' "
                                f"in a Contrast/Bolus Usage item, {_where('ContrastBolusUsageSequence')}"))
    if mixed and not contrast and series_unenhanced and policy.accept_unenhanced_series_of_mixed_study:
        mixed = []
    if contrast or mixed or not policy.oral_contrast_is_contrast:
        oral = []
    return contrast + mixed + oral


def _nonzero(text: str) -> bool:
    try:
        return float(text) != 0.0
    except ValueError:
        return bool(text.strip())
