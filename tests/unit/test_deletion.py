"""`deletion_plan`: a deleted run stops its steps, then a cleanup Job removes its storage."""

from __future__ import annotations

from kubetune.deletion import KEEP_STORAGE_ANNOTATION, deletion_plan
from kubetune.manifests import LABEL_RUN, Component
from kubetune.reconcile import JobState, Observed, PodState

from .test_reconcile import SETTINGS, body

STORAGE = {"storage": {"pvc": {"claimName": "shared"}}}


def running(component: Component, name: str) -> JobState:
    return JobState(name=name, component=component, active=1, pods=(PodState(name=f"{name}-x"),))


def cleanup(**state) -> JobState:
    return JobState(name="demo-cleanup", component=Component.CLEANUP, **state)


def test_a_running_step_is_stopped_before_anything_is_removed() -> None:
    observed = Observed(config_map=True, train=(running(Component.TRAIN, "demo-train-1"),))
    plan = deletion_plan(body(**STORAGE), observed, None, SETTINGS)
    assert [ref.name for ref in plan.delete] == ["demo-train-1"] and not plan.create and not plan.done
    # While it is going away, nothing else happens.
    stopping = Observed(config_map=True, train=(JobState(name="demo-train-1", component=Component.TRAIN,
                                                         active=1, terminating=True),))
    plan = deletion_plan(body(**STORAGE), stopping, None, SETTINGS)
    assert not plan.delete and not plan.create and not plan.done


def test_then_a_cleanup_job_removes_the_work_dir_and_is_deleted_when_done() -> None:
    finished = Observed(config_map=True, train=(JobState(name="demo-train-1", component=Component.TRAIN,
                                                         complete=True, succeeded=1),))
    plan = deletion_plan(body(**STORAGE), finished, None, SETTINGS)
    [job] = plan.create
    assert not plan.done and job["metadata"]["name"] == "demo-cleanup"
    assert "ownerReferences" not in job["metadata"]  # a foreground deletion must not take it along
    assert job["metadata"]["labels"][LABEL_RUN] == "demo"
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[-3:] == ["cleanup", "--work-dir", "/mnt/kubetune/team/demo"]
    assert {v["name"] for v in pod["volumes"]} >= {"storage"} and "config" not in {v["name"] for v in pod["volumes"]}
    assert pod["containers"][0]["securityContext"]["runAsNonRoot"] is True

    assert not deletion_plan(body(**STORAGE), finished, cleanup(active=1), SETTINGS).done
    plan = deletion_plan(body(**STORAGE), finished, cleanup(complete=True, succeeded=1), SETTINGS)
    assert plan.done and [(r.name, r.propagation) for r in plan.delete] == [("demo-cleanup", "Background")]


def test_a_failed_cleanup_does_not_hold_the_deletion_forever() -> None:
    plan = deletion_plan(body(**STORAGE), Observed(config_map=True),
                         cleanup(failed_reason="BackoffLimitExceeded"), SETTINGS)
    assert plan.done and "BackoffLimitExceeded" in plan.note


def test_keep_storage_and_invalid_specs_go_at_once() -> None:
    kept = body(annotations={KEEP_STORAGE_ANNOTATION: "true"}, **STORAGE)
    assert deletion_plan(kept, Observed(config_map=True), None, SETTINGS).done
    invalid = body(**STORAGE, contextLength=0)
    plan = deletion_plan(invalid, Observed(), None, SETTINGS)
    assert plan.done and not plan.create
