"""The lanes of `make test` cover every test file once, and the node agent's lane says so."""

from __future__ import annotations

from tests.support import lanes


def files_of(lane: lanes.Lane) -> set[str]:
    """The test files a lane's pytest arguments select (paths, folders, --ignore)."""
    paths = [a for a in lane.args if not a.startswith("--")]
    ignored = [a.removeprefix("--ignore=") for a in lane.args if a.startswith("--ignore=")]
    found = set()
    for path in paths:
        root = lanes.REPO / path
        for test in ([root] if root.is_file() else root.rglob("test_*.py")):
            rel = test.relative_to(lanes.REPO).as_posix()
            if not any(rel == i or rel.startswith(i.rstrip("/") + "/") for i in ignored):
                found.add(rel)
    return found


def test_each_test_file_runs_in_exactly_one_lane_on_real_nodes():
    real = [lane for lane in lanes.lanes() if "KUBETUNE_E2E_NODE" not in lane.env]
    every = {p.relative_to(lanes.REPO).as_posix() for p in (lanes.REPO / "tests").rglob("test_*.py")}
    counted = [f for lane in real for f in files_of(lane)]
    assert sorted(counted) == sorted(every)


def test_the_node_agent_lane_runs_the_harness_tests_and_what_real_nodes_cannot_serve():
    (agent,) = [lane for lane in lanes.lanes() if lane.name == "agent"]
    assert agent.env == {"KUBETUNE_E2E_NODE": "agent"}
    assert files_of(agent) == {"tests/cluster/test_harness.py"}
    for test_id in lanes.AGENT_ONLY:   # each names a test that exists
        path, name = test_id.split("::")
        assert test_id in agent.args and f"def {name}(" in (lanes.REPO / path).read_text()
