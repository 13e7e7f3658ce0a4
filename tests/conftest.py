"""Fixtures shared by every layer: the tiny model, built once per session, nothing downloaded."""

from __future__ import annotations

import pytest

pytest_plugins = ("tests.support.object_store",)  # s3_store / s3_env: a real S3 endpoint (moto)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from kubetune_trainer.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_model_no_system_dir(tmp_path_factory):
    """A model whose chat template refuses system messages, as some real ones do."""
    from kubetune_trainer.tinymodel import NO_SYSTEM_CHAT_TEMPLATE, build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model-nosys") / "model"
    return build_tiny_model(out, chat_template=NO_SYSTEM_CHAT_TEMPLATE)
