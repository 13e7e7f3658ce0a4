"""Model FLOPs utilisation: the FLOPs a model needs per token, and what the accelerator offers.

MFU = (6·N + 12·L·d·s) × non-padding tokens/s ÷ peak (PaLM, appendix B): N the parameters that
take part in a matmul, L layers, d the hidden size, s the sequence length; the second term is
attention's score and value products, which the parameters do not count.
"""

from __future__ import annotations

# Dense (no sparsity) bf16 tensor-core peak per GPU, from the vendors' data sheets; the first
# entry whose key is in the device name wins, so the more specific names come first.
PEAK_BF16_FLOPS = (
    ("B200", 2250e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """The bf16 peak of the named GPU; None for a CPU or a GPU not in the table (then no MFU)."""
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def matmul_parameters(model) -> int:
    """Parameters used in a matmul: all but the input embedding table, which is a lookup,
    unless it is tied to the output head (then it is the head's matmul, counted once)."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embeddings
    return total if tied else total - embeddings.numel()


def flops_per_token(model, sequence_length: int) -> float:
    """Training FLOPs per token (forward and backward) of a Hugging Face causal LM."""
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence_length
    return float(6 * matmul_parameters(model) + attention)
