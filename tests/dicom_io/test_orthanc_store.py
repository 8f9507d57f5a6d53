"""A real Orthanc accepts SEG, both SRs and key image by C-STORE and files them in the source study."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from liverfat.dicom_io.outputs import write_outputs
from tests.dicom_io.output_cases import make_result, phantom_series
from tests.orthanc import orthanc_server


@pytest.mark.slow
def test_orthanc_files_the_outputs_as_four_new_series_of_the_source_study(tmp_path: Path) -> None:
    series, liver = phantom_series(tmp_path / "ct")
    written = write_outputs(series, make_result(series, liver), tmp_path / "out", created_at=datetime(2024, 5, 6))
    outputs = [w.path for w in written]
    expected = {
        dataset.SeriesInstanceUID: (dataset.Modality, dataset.SeriesDescription, dataset.SOPInstanceUID)
        for dataset in (pydicom.dcmread(path, stop_before_pixels=True) for path in outputs)
    }
    with orthanc_server(tmp_path / "orthanc") as orthanc:
        orthanc.store(list(series.source_files))
        orthanc.store(outputs, all_sop_classes=True)
        orthanc.store(outputs, all_sop_classes=True)  # a re-send: deduplicated by SOP Instance UID
        (study,) = orthanc.get("/studies?expand")
        assert study["MainDicomTags"]["StudyInstanceUID"] == series.study_uid
        stored = {}
        for found in orthanc.get(f"/studies/{study['ID']}/series"):
            tags = found["MainDicomTags"]
            instances = [
                item["MainDicomTags"]["SOPInstanceUID"] for item in orthanc.get(f"/series/{found['ID']}/instances")
            ]
            stored[tags["SeriesInstanceUID"]] = (tags["Modality"], tags.get("SeriesDescription"), instances)
    assert len(stored.pop(series.series_uid)[2]) == len(series.datasets)
    assert stored == {uid: (modality, description, [sop]) for uid, (modality, description, sop) in expected.items()}
    assert sorted(modality for modality, _, _ in stored.values()) == ["OT", "SEG", "SR", "SR"]
