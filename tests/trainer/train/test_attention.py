"""FlexAttention, the GPU kernel for packed rows without flash-attention: no dense mask, the
same loss and gradients as SDPA with the collator's block-diagonal mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kubetune_trainer.config import Distributed
from kubetune_trainer.train.dataset import PackedCollator
from kubetune_trainer.train.model import composer_model
from kubetune_trainer.train.runtime import runtime_for

from .conftest import random_rows

CPU = runtime_for(Distributed(), device_batch_size=4, flash_attention=False)
GPU = runtime_for(Distributed(gpus_per_node=1), device_batch_size=4, flash_attention=False)
TOLERANCE = 1e-5  # on the loss


@pytest.fixture
def eager_flex(monkeypatch):
    """torch 2.7 compiles FlexAttention on a CPU for inference only (no logsumexp, no backward):
    here its kernel and its block-mask builder run eagerly; on a GPU transformers compiles both."""
    import transformers.integrations.flex_attention as integration
    import transformers.masking_utils as masking
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def kernel(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    def block_mask(*args, _compile=False, **kwargs):
        return create_block_mask(*args, _compile=False, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", kernel)
    monkeypatch.setattr(masking, "create_block_mask", block_mask)


def loss_and_grads(runtime, model_dir, rows):
    torch.manual_seed(0)
    model = composer_model(str(model_dir), runtime)
    batch = PackedCollator(block_mask=runtime.block_mask)(rows)
    loss = model.loss(model(batch), batch)
    loss.backward()
    return batch, loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def tensor_rows():
    return [{k: torch.from_numpy(v.astype(np.int64)) for k, v in row.items()} for row in random_rows(4, seed=5)]


def test_flex_attention_keeps_samples_apart_like_the_masked_path(tiny_model_dir, eager_flex):
    assert GPU.attn_implementation == "flex_attention" and CPU.attn_implementation == "sdpa"
    rows = tensor_rows()
    masked_batch, masked_loss, masked_grads = loss_and_grads(CPU, tiny_model_dir, rows)
    flex_batch, flex_loss, flex_grads = loss_and_grads(GPU, tiny_model_dir, rows)
    assert "attention_mask" in masked_batch and "attention_mask" not in flex_batch  # no dense mask
    torch.testing.assert_close(flex_loss, masked_loss, rtol=0, atol=TOLERANCE)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_control_plain_causal_attention_over_the_row_changes_the_loss(tiny_model_dir):
    rows = tensor_rows()
    _, masked_loss, _ = loss_and_grads(CPU, tiny_model_dir, rows)
    model = composer_model(str(tiny_model_dir), CPU)
    model.model.config.use_cache = True  # a cache hides the packing from transformers
    batch = PackedCollator(block_mask=False)(rows)
    leak = (model.loss(model(batch), batch).detach() - masked_loss).abs()
    assert leak > 10 * TOLERANCE  # what the comparison above would catch
