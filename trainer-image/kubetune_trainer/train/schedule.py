"""The managed service's schedule: linear warmup over 2% of the run, then linear decay to 0."""

from __future__ import annotations

import warnings

from composer.core import State
from composer.optim import LinearWithWarmupScheduler

WARMUP = "0.02dur"


class WarmupLinearDecay(LinearWithWarmupScheduler):
    """`dur` resolves against whatever unit max_duration has (ep -> batches, tok, ba), so one
    scheduler serves every trainingDuration; Composer multiplies the optimizer's peak LR by it."""

    def __init__(self):
        super().__init__(t_warmup=WARMUP, alpha_i=1.0, alpha_f=0.0)

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        # Runs shorter than 50 batches have no warmup batch at all; Composer warns on every step.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The warmup duration is 0")
            return super().__call__(state, ssr)
