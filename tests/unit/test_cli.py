"""The command line's errors: a few clear lines naming what and where, a non-zero exit."""

import textwrap

from kubetune.cli import main


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    err = capsys.readouterr().err
    assert "nope.yaml: cannot read" in err and "Traceback" not in err


def test_broken_yaml_names_the_line(tmp_path, capsys):
    path = write(tmp_path, """\
        kind: TrainingRun
        spec: {model: [unclosed
        """)
    assert main(["validate", path]) == 1
    assert "run.yaml:" in capsys.readouterr().err


def test_invalid_spec_names_the_field(tmp_path, capsys):
    path = write(tmp_path, """\
        apiVersion: kubetune.dev/v1alpha1
        kind: TrainingRun
        metadata: {name: bad}
        spec:
          model: m
          trainDataPath: /data/train.jsonl
          registerTo: not-a-name
          trainingDuration: 3 weeks
        """)
    assert main(["validate", path]) == 1
    err = capsys.readouterr().err
    assert "spec.registerTo" in err and "spec.trainingDuration" in err and "Traceback" not in err


def test_run_without_local_explains_itself(tmp_path, capsys):
    path = write(tmp_path, "kind: TrainingRun\n")
    assert main(["run", path]) == 1
    assert "--local" in capsys.readouterr().err


def test_validate_says_why_data_checks_are_skipped(tmp_path, capsys, monkeypatch):
    """No trainer extra at all, or one installed without a dependency: each named; a valid spec
    still exits 0."""
    import builtins

    path = write(tmp_path, """\
        apiVersion: kubetune.dev/v1alpha1
        kind: TrainingRun
        metadata: {name: good}
        spec:
          model: m
          trainDataPath: /data/train.jsonl
          registerTo: main.team.model
        """)
    real_import = builtins.__import__
    for missing, expected in (("kubetune_trainer.data", "install kubetune[trainer]"),
                              ("tokenizers", "installed without its dependency 'tokenizers'")):
        def fake_import(name, *args, _missing=missing, **kwargs):
            if name == "kubetune_trainer.data":
                raise ModuleNotFoundError(f"No module named {_missing!r}", name=_missing)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)
        assert main(["validate", path]) == 0
        monkeypatch.setattr(builtins, "__import__", real_import)
        out = capsys.readouterr().out
        assert "spec valid" in out and expected in out, out


def test_validate_lets_a_broken_trainer_import_surface(tmp_path, capsys, monkeypatch):
    """An ImportError that is not a missing module is a defect, not a skipped check."""
    import builtins

    path = write(tmp_path, """\
        apiVersion: kubetune.dev/v1alpha1
        kind: TrainingRun
        metadata: {name: good}
        spec: {model: m, trainDataPath: /data/train.jsonl, registerTo: main.team.model}
        """)
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "kubetune_trainer.data":
            raise ImportError("cannot import name 'analyze'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert main(["validate", path]) != 0
    captured = capsys.readouterr()
    assert "cannot import name 'analyze'" in captured.err and "skipped" not in captured.out
