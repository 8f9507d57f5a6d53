"""The worker's processing of one job, in this process, with the phantom backend (the only fake)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from liverfat.analysis import ModelCache
from liverfat.service.config import (
    Destination,
    ModelSection,
    NodeConfig,
    NodeSection,
    OutputsSection,
    SendSection,
    WorkerSection,
)
from liverfat.service.diskspace import DiskSpace
from liverfat.service.spool import InstanceInfo, Job, JobState, Spool
from liverfat.service.worker import ModelLoader, process_job
from tests.phantom import SeriesHeader
from tests.service.conftest import PHANTOM_LIVER_HU, node_config, phantom_series
from tests.service.fake_backend import PhantomLiverBackend

pytestmark = pytest.mark.slow  # each test runs the real pipeline on a phantom series (a few seconds)


def spool_series(config: NodeConfig, files: list[Path]) -> tuple[Spool, Job]:
    """Put ``files`` through the spool as the listener would, and claim the job."""
    spool = Spool(config.spool.dir)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.store_instance(path.read_bytes(), InstanceInfo(ds.SOPInstanceUID, ds.SOPClassUID, ds.SeriesInstanceUID,
                                                             ds.StudyInstanceUID, "SCU"))  # fmt: skip
    spool.complete_stable(0.0)
    job = spool.claim_next()
    assert job is not None
    return spool, job


def with_destination(tmp_path: Path) -> NodeConfig:
    return replace(node_config(tmp_path), send=SendSection(destinations=(Destination("PACS", "127.0.0.1", 104),)))


def test_eligible_series_is_measured_and_seg_sr_key_image_are_queued(tmp_path: Path) -> None:
    config = with_destination(tmp_path)
    spool, job = spool_series(config, phantom_series(tmp_path / "ct"))
    result = process_job(job, spool, config, ModelCache(PhantomLiverBackend.loader()))
    done = spool.job(job.id)
    assert done.state is JobState.DONE and result.state is JobState.DONE
    assert done.grade == "moderate-to-severe"
    assert done.parenchymal_hu == pytest.approx(PHANTOM_LIVER_HU, abs=3.0)
    assert done.processing_s is not None and done.processing_s > 0
    sends = spool.due_sends()
    assert sorted(s.path.name for s in sends) == ["keyimage.dcm", "seg.dcm", "sr-summary.dcm", "sr.dcm"]
    assert all(s.destination == "PACS@127.0.0.1:104" and s.path.is_file() for s in sends)
    sop_classes = {pydicom.dcmread(s.path, stop_before_pixels=True).SOPClassUID for s in sends}
    assert {s.sop_class_uid for s in sends} == sop_classes
    stages = {"discover", "load", "image_checks", "resample", "segment", "rois", "measure", "grade", "masks", "write"}
    assert set(done.timings) == stages and all(seconds >= 0 for seconds in done.timings.values())


def test_outputs_carry_the_node_ae_title_and_the_site_texts(tmp_path: Path) -> None:
    site = OutputsSection(institution_name="Hôpital Général", institutional_department_name="Radiologie")
    config = replace(with_destination(tmp_path), node=NodeSection(ae_title="FATNODE"), outputs=site)
    spool, job = spool_series(config, phantom_series(tmp_path / "ct"))
    process_job(job, spool, config, ModelCache(PhantomLiverBackend.loader()))
    for send in spool.due_sends():
        dataset = pydicom.dcmread(send.path, stop_before_pixels=True)
        assert dataset.StationName == "FATNODE", send.path.name
        assert dataset.InstitutionName == "Hôpital Général", send.path.name
        assert dataset.InstitutionalDepartmentName == "Radiologie", send.path.name


def test_header_ineligible_series_is_rejected_without_its_pixels_being_read(tmp_path: Path) -> None:
    """The pixel data here is undecodable RLE: any attempt to read it would add a decode failure."""
    config = with_destination(tmp_path)
    files = phantom_series(tmp_path / "ct", SeriesHeader(contrast_agent="IV OMNIPAQUE"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.PixelData = encapsulate([b"not RLE at all!!" * 4])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    spool, job = spool_series(config, files)
    result = process_job(job, spool, config, ModelCache(PhantomLiverBackend.loader()))
    rejected = spool.job(job.id)
    assert rejected.state is JobState.REJECTED and result.outputs == ()
    assert [r["code"] for r in result.reasons] == ["contrast"]
    assert spool.due_sends() == []


def test_ineligible_series_gets_a_not_applicable_sr_when_configured(tmp_path: Path) -> None:
    config = replace(with_destination(tmp_path), worker=WorkerSection(ineligible_result="sr"))
    spool, job = spool_series(config, phantom_series(tmp_path / "ct", SeriesHeader(contrast_agent="IV")))
    process_job(job, spool, config, ModelCache(PhantomLiverBackend.loader()))
    assert spool.job(job.id).state is JobState.REJECTED
    [send] = spool.due_sends()
    assert send.path.name == "sr-summary.dcm"
    sr = pydicom.dcmread(send.path)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == pydicom.dcmread(spool.job_files(job)[0]).StudyInstanceUID
    texts = [item.TextValue for item in _content_items(sr) if item.ValueType == "TEXT"]
    assert any("Not graded" in text and "contrast" in text.lower() for text in texts)


def _content_items(dataset: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in dataset.get("ContentSequence", []):
        items += [item, *_content_items(item)]
    return items


def test_a_model_that_cannot_be_loaded_fails_the_series_with_the_reason(tmp_path: Path) -> None:
    config = with_destination(tmp_path)
    spool, job = spool_series(config, phantom_series(tmp_path / "ct"))
    loader = ModelLoader(ModelSection(name=str(tmp_path / "no-such-model"), device="cpu"))
    process_job(job, spool, config, ModelCache(loader))
    failed = spool.job(job.id)
    assert failed.state is JobState.FAILED
    assert "no-such-model" in str(failed.last_error)
    assert spool.due_sends() == []


def test_instances_that_are_not_readable_reject_the_series_with_reasons(tmp_path: Path) -> None:
    config = with_destination(tmp_path)
    spool, job = spool_series(config, phantom_series(tmp_path / "ct")[:3])
    for path in spool.job_files(job):
        path.write_bytes(b"\0" * 200)
    result = process_job(job, spool, config, ModelCache(PhantomLiverBackend.loader()))
    assert spool.job(job.id).state is JobState.REJECTED
    assert len(result.reasons) == 3


def test_a_series_processed_while_the_disk_filled_is_parked_with_its_results_deleted(tmp_path: Path) -> None:
    config = with_destination(tmp_path)
    spool, job = spool_series(config, phantom_series(tmp_path / "ct"))
    space = DiskSpace(config.spool.dir)
    assert space.restore()
    models = ModelCache(PhantomLiverBackend.loader())
    space.release("the test filled the disk")  # as the node does when free space runs out
    result = process_job(job, spool, config, models, space)
    parked = spool.job(job.id)
    assert result.state is JobState.COMPLETE and (parked.state, parked.attempts) == (JobState.COMPLETE, 0)
    assert "disk is full" in str(parked.last_error) and "not counted" in str(parked.last_error)
    assert not (spool.results_dir / str(job.id)).exists() and spool.due_sends() == []
    assert space.restore()
    again = spool.claim_next()
    assert again is not None and process_job(again, spool, config, models, space).state is JobState.DONE
    assert spool.job(job.id).attempts == 1
