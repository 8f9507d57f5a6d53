"""End to end with a real Orthanc: storescu a CT into Orthanc, its Lua routes the series to the node,
the node sends SEG + two SRs + key image back, and they are found in the same study through Orthanc's REST API.

Orthanc, the node and every client run in one private network namespace (``tests/orthanc.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from liverfat.service.spool import JobState
from tests.orthanc import OrthancServer, orthanc_server
from tests.service.conftest import PHANTOM_LIVER_HU, phantom_series
from tests.service.node_process import REPO, NodeProcess, pid_alive, wait_for

pytestmark = pytest.mark.slow

AUTOROUTE = REPO / "deploy" / "orthanc" / "autoroute.lua"
NODE_PORT = 11112  # inside the private namespace every port is free
RESULT_COUNTS = {"OT": 1, "SEG": 1, "SR": 2}  # key image, SEG, circle SR + summary SR
_DOWNLOAD = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=30) as answer, open(sys.argv[2], 'wb') as out:\n"
    "    out.write(answer.read())\n"
)


@contextmanager
def orthanc_and_node(tmp_path: Path, **extra: dict[str, Any]) -> Iterator[tuple[OrthancServer, NodeProcess]]:
    """Orthanc with the deploy/ Lua routing and the node registered; the node (not started) sends back to it."""
    modalities = {"LIVERFAT": {"AET": "LIVERFAT", "Host": "127.0.0.1", "Port": NODE_PORT}}
    with orthanc_server(tmp_path / "orthanc", modalities=modalities, lua_scripts=[AUTOROUTE]) as orthanc:
        sections: dict[str, dict[str, Any]] = {
            "node": {"host": "127.0.0.1", "port": NODE_PORT, "allowed_callers": ["ORTHANC@127.0.0.1"]},
            "spool": {"dir": str(tmp_path / "spool"), "min_free_disk_mb": 0},
            "series": {"stable_seconds": 5.0, "complete_on_release": True},  # Orthanc sends a series per association
            "send": {"destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], "first_delay_s": 0.5,
                     "max_delay_s": 2.0},  # fmt: skip
            "http": {"host": "127.0.0.1", "port": 9112},
        }
        for name, keys in extra.items():
            sections.setdefault(name, {}).update(keys)
        node = NodeProcess(tmp_path / "node", sections, netns=orthanc.netns)
        try:
            yield orthanc, node
            if node.process is not None:
                assert node.terminate() == 0
        finally:
            node.close()


def results_in_study(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]]:
    """Orthanc instance ids by modality, for every series of the study."""
    studies = [s for s in orthanc.get("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]
    found: dict[str, list[str]] = {}
    for study in studies:
        for series in orthanc.get(f"/studies/{study['ID']}/series"):
            found.setdefault(series["MainDicomTags"]["Modality"], []).extend(series["Instances"])
    return found


def all_results_arrived(orthanc: OrthancServer, study_uid: str) -> dict[str, list[str]] | None:
    found = results_in_study(orthanc, study_uid)
    return found if all(len(found.get(modality, [])) >= n for modality, n in RESULT_COUNTS.items()) else None


def fetch(orthanc: OrthancServer, instance_id: str, target: Path) -> Dataset:
    orthanc.run(sys.executable, "-c", _DOWNLOAD, f"http://127.0.0.1:{orthanc.http_port}/instances/{instance_id}/file",
                str(target))  # fmt: skip
    return pydicom.dcmread(target)


def method_values(sr: Dataset) -> dict[str, float]:
    """Attenuation values of the SR by method code (DL-PARENCHYMAL, DL-VOLUMETRIC, DL-AXIAL)."""
    values: dict[str, float] = {}

    def walk(items: Any) -> None:
        for item in items:
            nested = item.get("ContentSequence", [])
            if item.get("ValueType") == "NUM":
                codes = {str(c.ConceptCodeSequence[0].CodeValue) for c in nested if "ConceptCodeSequence" in c}
                for method in codes & {"DL-PARENCHYMAL", "DL-VOLUMETRIC", "DL-AXIAL"}:
                    values[method] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(nested)

    walk(sr.ContentSequence)
    return values


def check_one_set_of_results(orthanc: OrthancServer, study_uid: str, tmp_path: Path, expected_hu: float,
                             tolerance_hu: float) -> Dataset:  # fmt: skip
    """Exactly one SEG, two SRs and one key image in the study; the summary SR's DL-parenchymal near ``expected_hu``."""
    found = wait_for(lambda: all_results_arrived(orthanc, study_uid), 120, "SEG, SRs and key image in Orthanc")
    assert {modality: len(found[modality]) for modality in RESULT_COUNTS} == RESULT_COUNTS
    reports = [fetch(orthanc, instance, tmp_path / f"sr{i}.dcm") for i, instance in enumerate(found["SR"])]
    assert all(report.StudyInstanceUID == study_uid for report in reports)
    (sr,) = [report for report in reports if "DL-PARENCHYMAL" in method_values(report)]  # the summary SR
    values = method_values(sr)
    assert values["DL-PARENCHYMAL"] == pytest.approx(expected_hu, abs=tolerance_hu)
    return sr


def test_phantom_ct_routed_by_orthanc_comes_back_as_seg_sr_and_key_image(tmp_path: Path) -> None:
    files = phantom_series(tmp_path / "ct")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with orthanc_and_node(tmp_path) as (orthanc, node):
        node.start()
        orthanc.store(files, calling_aet="MODALITY")
        check_one_set_of_results(orthanc, study_uid, tmp_path, PHANTOM_LIVER_HU, 3.0)
        assert "liverfat: CT series" in orthanc.log.read_text(), "the deploy/ Lua script routed the series"
        assert len(results_in_study(orthanc, study_uid)["CT"]) == len(files)


def test_results_survive_a_node_killed_while_processing_and_an_orthanc_down_when_they_are_due(tmp_path: Path) -> None:
    files = phantom_series(tmp_path / "ct")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with orthanc_and_node(tmp_path) as (orthanc, node):
        node.start(delay_s=60.0)
        orthanc.store(files, calling_aet="MODALITY")
        wait_for(lambda: node.state() is JobState.PROCESSING, 60, "the node to start processing")
        worker = node.worker_pid
        node.kill()
        wait_for(lambda: not pid_alive(worker), 10, "the worker to die with the node (no orphan keeps processing)")
        orthanc.stop()  # the destination is down when the results become due
        node.start()
        wait_for(lambda: node.state() is JobState.DONE, 120, "the restarted node to finish the series")
        # the whole node was killed, not the series' worker alone: the interrupted attempt does not count
        assert node.jobs()[0].attempts == 1, "processed once more, without an attempt held against the series"
        node_spool = node.spool()
        wait_for(lambda: node_spool.query("SELECT SUM(failures) AS n FROM outbox")[0]["n"], 30, "a failed send")
        node_spool.close()
        orthanc.start()
        check_one_set_of_results(orthanc, study_uid, tmp_path, PHANTOM_LIVER_HU, 3.0)


@pytest.mark.shared_data
def test_real_3dircadb_series_with_the_default_model(tmp_path: Path, shared_data: Path) -> None:
    """A whole real (contrast-enhanced abdominal) series: the policy is opened so that it is processed.

    The expected value is the mean HU inside the data set's manual liver mask; the
    DL-parenchymal ROIs sample a part of that liver, hence the tolerance.
    """
    ct_folder = shared_data / "3dircadb-1.1" / "PATIENT_DICOM"
    files = sorted(ct_folder.iterdir())
    manual_hu = manual_liver_mean_hu(ct_folder, shared_data / "3dircadb-1.1" / "MASKS_DICOM" / "liver")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with orthanc_and_node(tmp_path, eligibility={"require_chest_evidence": False}) as (orthanc, node):
        node.start(wait_model=True, real_model=True)
        orthanc.store(files, calling_aet="MODALITY")
        check_one_set_of_results(orthanc, study_uid, tmp_path, manual_hu, 20.0)


def manual_liver_mean_hu(ct_folder: Path, mask_folder: Path) -> float:
    """Mean HU of the CT inside the manual mask (slices paired by file name, as the data set pairs them)."""
    total, count = 0.0, 0
    for ct_path in ct_folder.iterdir():
        ct = pydicom.dcmread(ct_path)
        mask = pydicom.dcmread(mask_folder / ct_path.name).pixel_array > 0
        hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
        total += float(np.sum(hu[mask]))
        count += int(mask.sum())
    return total / count
