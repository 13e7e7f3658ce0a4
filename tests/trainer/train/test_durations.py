"""trainingDuration in `ba`, `ep` and `tok`, and the LR curve Composer drives over it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from composer.core import Callback

from kubetune_trainer.train import run_train
from kubetune_trainer.train.dataset import open_prepared


class Recorder(Callback):
    """The LR each batch trains with, the token count and the reported percent after each batch."""

    def __init__(self, progress_file: str):
        self.progress_file = Path(progress_file)
        self.lrs, self.tokens, self.percents, self.batches = [], [], [], 0

    def batch_start(self, state, logger):
        self.lrs.append(state.optimizers[0].param_groups[0]["lr"])

    def batch_end(self, state, logger):  # runs after the trainer's own progress callback
        self.tokens.append(int(state.timestamp.token))
        self.percents.append(json.loads(self.progress_file.read_text())["percent"])

    def fit_end(self, state, logger):
        self.batches = int(state.timestamp.batch)


def train(config) -> Recorder:
    recorder = Recorder(config.progress_file)
    run_train(config, callbacks=[recorder])
    return recorder


def real_tokens(config) -> int:
    return int((np.asarray(open_prepared(config.data_dir, "train").sequence_ids) > 0).sum())


def test_batches(make_config):
    assert train(make_config(training_duration="6ba")).batches == 6


def test_epochs_cover_every_real_token_once_per_epoch_and_progress_follows_batches(make_config):
    config = make_config(training_duration="2ep")
    recorder = train(config)
    assert recorder.batches == 8  # 16 rows, 4 per batch
    assert recorder.tokens[-1] == 2 * real_tokens(config)  # the dataloader reports tokens, padding excluded
    # Composer counts epochs whole (0 until the first ends); the report counts batches.
    assert recorder.percents == [12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0]


def test_tokens_stop_at_the_first_batch_reaching_the_budget(make_config):
    config = make_config(training_duration="300tok")
    recorder = train(config)
    assert recorder.tokens[-1] >= 300 > recorder.tokens[-2]
    assert recorder.batches == len(recorder.tokens) > 1


def schedule(step: int, peak: float, warmup: int, total: int) -> float:
    return peak * step / warmup if step < warmup else peak * (1 - (step - warmup) / (total - warmup))


@pytest.mark.parametrize("duration", ["100ba", "25ep"])
def test_lr_warms_up_over_2_percent_then_decays_linearly_to_zero(make_config, duration):
    peak, warmup, total = 1e-3, 2, 100  # 2% of 100 batches; 25 epochs of 4 batches resolve to the same
    recorder = train(make_config(training_duration=duration, save_interval="100ba", learning_rate=peak))
    # Composer steps its schedulers before advancing the clock: batch b trains with the LR of b-1.
    expected = [schedule(max(b - 1, 0), peak, warmup, total) for b in range(total)]
    np.testing.assert_allclose(recorder.lrs, expected, rtol=1e-6, atol=1e-12)
    assert max(recorder.lrs) == pytest.approx(peak) and recorder.lrs[-1] == pytest.approx(peak * 2 / 98)
