"""Where a step's result goes (kubetune_trainer/results.py): the termination message file the
kubelet mounts, and nowhere outside a pod."""

from __future__ import annotations

import json

from kubetune_trainer import results


def test_the_result_goes_to_the_file_the_kubelet_mounted(tmp_path, monkeypatch):
    # In a pod the folder (/dev) is not the user's to write, only the file: tests/cluster/test_node.py
    # and the e2e runs on real nodes (KUBETUNE_E2E_NODE=kubelet) read results so.
    mounted = tmp_path / "termination-log"
    mounted.write_text("")
    monkeypatch.delenv("KUBETUNE_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(results, "TERMINATION_LOG", str(mounted))
    results.write_result("prepare", True, samples=3)
    assert json.loads(mounted.read_text()) == {"ok": True, "samples": 3, "step": "prepare"}


def test_outside_a_pod_no_file_is_made(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBETUNE_TERMINATION_LOG", raising=False)
    monkeypatch.setattr(results, "TERMINATION_LOG", str(tmp_path / "termination-log"))
    assert results.write_result("prepare", True) == {"ok": True, "step": "prepare"}
    assert list(tmp_path.iterdir()) == []
