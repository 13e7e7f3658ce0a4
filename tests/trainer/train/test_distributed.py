"""Two processes under torchrun on CPU (gloo), launched the way the operator launches pods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kubetune_trainer.config import Distributed, dump_config

from .conftest import free_port, random_rows, write_prepared

WORKER = Path(__file__).with_name("dist_worker.py")
REPO = Path(__file__).resolve().parents[3]


def launch(config_file: Path, *, nnodes: int, nproc: int, node_rank: int, port: int,
           **extra_env: str) -> "Launch":
    """One pod's command: torchrun with the rendezvous environment the operator sets."""
    env = {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "trainer-image")]),
           "OMP_NUM_THREADS": "1", "NNODES": str(nnodes), "NPROC_PER_NODE": str(nproc),
           "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", env["NNODES"],
               "--nproc-per-node", env["NPROC_PER_NODE"], "--node-rank", env["NODE_RANK"],
               "--master-addr", env["MASTER_ADDR"], "--master-port", env["MASTER_PORT"],
               str(WORKER), str(config_file)]
    return Launch(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


class Launch:
    def __init__(self, process: subprocess.Popen):
        self.process = process

    def communicate(self, timeout: float) -> tuple[subprocess.Popen, str]:
        _, err = self.process.communicate(timeout=timeout)
        return self.process, err


def test_two_ranks_train_the_same_model(make_config, tmp_path):
    config = make_config(training_duration="1ep", global_batch_size=4, metrics_port=free_port(),
                         distributed=Distributed(procs_per_node=2), eval_data_path="unused",
                         eval_prompts=["hello"])  # eval and generate need every rank's part
    write_prepared(Path(config.data_dir), "eval", random_rows(4, seed=2))
    config_file = tmp_path / "config.json"
    dump_config(config, config_file)
    done = launch(config_file, nnodes=1, nproc=2, node_rank=0, port=free_port()).communicate(timeout=240)
    assert done[0].returncode == 0, done[1][-3000:]

    result_dir = Path(config.result_dir)
    ranks = [json.loads((result_dir / f"weights-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"]  # gradients were all-reduced
    assert ranks[0]["initial"] == ranks[1]["initial"] != ranks[0]["final"]
    assert ranks[0]["batches"] == 4  # 16 rows, a global batch of 4 = 2 rows on each rank
    # Side effects on rank 0 only: one result, one checkpoint file per save, progress from rank 0.
    train = json.loads((result_dir / "train.json").read_text())
    assert train["latestCheckpoint"].endswith("ep1-ba4-rank0.pt")
    saved = sorted(p.name for p in Path(config.checkpoint_dir).iterdir())
    assert saved == ["ep1-ba4-rank0.pt", "latest-rank0.pt"]
    assert json.loads(Path(config.progress_file).read_text())["batchesDone"] == 4


def test_two_nodes_sharing_one_checkpoint_folder_train_then_resume(make_config, tmp_path):
    """Two "nodes" (two torchrun launches, node ranks 0 and 1) on one shared folder, as two pods
    on a ReadWriteMany PVC: both start, train the same model, and a relaunch resumes."""
    config = make_config(training_duration="1ep", global_batch_size=4, metrics_port=free_port(),
                         distributed=Distributed(nodes=2, procs_per_node=1))
    config_file = tmp_path / "config.json"
    dump_config(config, config_file)

    def both_nodes() -> None:
        port = free_port()
        nodes = [launch(config_file, nnodes=2, nproc=1, node_rank=r, port=port) for r in (0, 1)]
        for process, err in (node.communicate(timeout=240) for node in nodes):
            assert process.returncode == 0, err[-3000:]

    both_nodes()
    result_dir = Path(config.result_dir)
    ranks = [json.loads((result_dir / f"weights-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"]
    first = json.loads((result_dir / "train.json").read_text())["latestCheckpoint"]
    both_nodes()  # a retry after the end: both nodes load the shared checkpoint and just report
    assert json.loads((result_dir / "train.json").read_text())["latestCheckpoint"] == first


def test_two_nodes_on_an_object_store_each_with_its_own_staging_copy(make_config, tmp_path, s3_env):
    """Two "nodes" that share no folder, only an S3 work_dir: each stages its own copy, the
    checkpoint and pointer are uploaded once all ranks saved, and relaunched nodes with empty
    staging folders pull the checkpoint and just report."""
    from kubetune_trainer.contract import ENV_SCRATCH_DIR
    from kubetune_trainer.storage import Mirror

    prefix = f"dist/{tmp_path.name}"
    local = make_config()
    Mirror(s3_env.uri(prefix), Path(local.work_dir)).push("data")  # prepared, as `prepare` leaves it
    config = local.model_copy(update={"work_dir": s3_env.uri(prefix), "metrics_port": free_port(),
                                      "distributed": Distributed(nodes=2, procs_per_node=1)})
    config_file = tmp_path / "config.json"
    dump_config(config, config_file)

    def both_nodes(round_: int) -> None:
        port = free_port()
        nodes = [launch(config_file, nnodes=2, nproc=1, node_rank=r, port=port,
                        **{ENV_SCRATCH_DIR: str(tmp_path / f"round{round_}-node{r}")}) for r in (0, 1)]
        done = [node.communicate(timeout=240) for node in nodes]
        assert [p.returncode for p, _ in done] == [0, 0], "\n".join(err[-3000:] for _, err in done)

    both_nodes(1)
    keys = s3_env.keys(prefix)
    assert {"checkpoints/ep1-ba4-rank0.pt", "checkpoints/latest-rank0.pt.symlink", "result/train.json",
            "result/weights-rank0.json", "result/weights-rank1.json"} <= set(keys), keys
    fs = s3_env.filesystem()
    ranks = [json.loads(fs.cat_file(f"{s3_env.bucket}/{prefix}/result/weights-rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"] != ranks[0]["initial"]  # node 1 pushed its own record
    first = json.loads(fs.cat_file(f"{s3_env.bucket}/{prefix}/result/train.json"))["latestCheckpoint"]
    assert first == s3_env.uri(f"{prefix}/checkpoints/ep1-ba4-rank0.pt")

    both_nodes(2)  # fresh pods: nothing local, both pull the checkpoint and find the run finished
    assert list((tmp_path / "round2-node1").rglob("ep1-ba4-rank0.pt"))  # node 1 pulled it to resume
    again = json.loads(s3_env.filesystem().cat_file(f"{s3_env.bucket}/{prefix}/result/train.json"))
    assert again["latestCheckpoint"] == first
