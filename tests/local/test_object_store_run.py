"""`kubetune run --local` with `storage.uri` on an object store (a real S3 endpoint): every step
works on a staging copy, the bucket ends up holding the run's data, checkpoints and model, and
the model folder read back from the bucket loads with plain `transformers`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

from .test_run_local import LOAD_AND_GENERATE, kubetune, quickstart_with, registered_versions


def test_a_run_on_s3_storage_succeeds_and_leaves_everything_in_the_bucket(s3_env, tmp_path, tiny_model_dir):
    prefix = f"local-runs/{uuid.uuid4().hex[:8]}"
    run_file = quickstart_with(tmp_path, tiny_model_dir, storage={"uri": s3_env.uri(prefix)})
    workdir = tmp_path / "work"
    done = kubetune("run", str(run_file), "--local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work_uri = s3_env.uri(f"{prefix}/default/quickstart")
    assert "] 100.0%" in done.stdout  # progress read from rank 0's staging copy
    assert f"model folder:     {work_uri}/hf" in done.stdout
    assert len(registered_versions(workdir, "main.demo.quickstart")) == 1

    keys = s3_env.keys(f"{prefix}/default/quickstart")
    for expected in ("data/_SUCCESS", "data/train/input_ids.npy", "checkpoints/latest-rank0.pt.symlink",
                     "hf/model.safetensors", "hf/config.json", "hf/.kubetune-source.json",
                     "result/train.json", "result/register.json"):
        assert expected in keys, (expected, keys)
    assert any(k.startswith("checkpoints/ep") and k.endswith("-rank0.pt") for k in keys), keys
    status = json.loads((workdir / "quickstart" / "status.json").read_text())
    assert status["phase"] == "Succeeded" and status["latestCheckpoint"].startswith(f"{work_uri}/checkpoints/")
    assert not (workdir / "storage").exists()  # nothing went to local storage instead

    folder = tmp_path / "from-bucket"
    s3_env.filesystem().get(f"{s3_env.bucket}/{prefix}/default/quickstart/hf/", str(folder), recursive=True)
    generated = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_GENERATE, str(folder)],
                               capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert int(generated.stdout.strip().splitlines()[-1]) > 0
