"""The node's /metrics, read back with prometheus_client's own parsers."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from liverfat import __version__
from liverfat.service.metrics import exposition, node_registry
from liverfat.service.spool import PROCESSING_BUCKETS_S, JobState
from tests.service.test_health import FAILING, NO_WEIGHTS, counts, one_worker, status, worker


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_carry_version_counts_grades_reasons_restarts_histogram_and_process_metrics() -> None:
    buckets = {le: (1 if le >= 10 else 0) for le in PROCESSING_BUCKETS_S}
    jobs = {state: 0 for state in JobState} | {JobState.DONE: 2, JobState.REJECTED: 1}
    current = status(
        counts=counts(instances=61, send_failures=4, jobs=jobs, processing_count=1, processing_sum_s=8.5,
                      processing_buckets=buckets, destinations=(FAILING,),
                      grades={"moderate-to-severe": 1, "not moderate-to-severe": 1, "not graded": 1},
                      reasons={"contrast": 1, "roi_on_vessel": 2}),
        workers=(worker(restarts=3),),
    )  # fmt: skip
    body, content_type = exposition(node_registry(lambda: current), accept=None)
    assert content_type.startswith("text/plain; version=")
    found = samples(body.decode())
    assert found[("liverfat_build_info", (("version", __version__),))] == 1
    assert found[("liverfat_healthy", ())] == 0  # FAILING has failed for 200 s, past the default 180 s
    assert found[("liverfat_instances_received_total", ())] == 61
    assert found[("liverfat_series", (("state", "done"),))] == 2
    assert found[("liverfat_series", (("state", "failed"),))] == 0
    assert found[("liverfat_series_by_grade", (("grade", "moderate-to-severe"),))] == 1
    assert found[("liverfat_series_by_grade", (("grade", "not graded"),))] == 1
    assert found[("liverfat_series_by_reason", (("reason", "roi_on_vessel"),))] == 2
    assert found[("liverfat_processing_seconds_bucket", (("le", "5.0"),))] == 0
    assert found[("liverfat_processing_seconds_bucket", (("le", "10.0"),))] == 1
    assert found[("liverfat_processing_seconds_bucket", (("le", "+Inf"),))] == 1
    assert found[("liverfat_processing_seconds_sum", ())] == 8.5
    assert found[("liverfat_processing_seconds_count", ())] == 1
    assert found[("liverfat_send_failures_total", ())] == 4
    assert found[("liverfat_destination_failing_seconds", (("destination", "PACS@10.0.0.5:104"),))] == 200
    assert found[("liverfat_up", (("component", "worker"),))] == 1
    assert found[("liverfat_up", (("component", "model"),))] == 1
    assert found[("liverfat_worker_restarts_total", ())] == 3
    assert found[("process_resident_memory_bytes", ())] > 0 and ("process_cpu_seconds_total", ()) in found


def test_each_node_has_its_own_registry_and_openmetrics_is_served_on_request() -> None:
    healthy, broken = status(), one_worker(model=NO_WEIGHTS, up=False)
    first, second = node_registry(lambda: healthy), node_registry(lambda: broken)
    assert samples(exposition(first, None)[0].decode())[("liverfat_healthy", ())] == 1
    found = samples(exposition(second, None)[0].decode())
    assert found[("liverfat_healthy", ())] == 0 and found[("liverfat_up", (("component", "model"),))] == 0
    body, content_type = exposition(first, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(body.decode())}
    assert {"liverfat_build", "liverfat_series", "liverfat_processing_seconds", "process_cpu_seconds"} <= names
