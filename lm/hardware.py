"""Datasheet peak FLOP/s of one device: the denominator of MFU (lm.train's log lines) and of
the time to train (`python -m lm.plan --tokens`).

Dense peaks (no 2:4 sparsity) of the tensor cores / MXUs per compute dtype, for one JAX device
(one GPU; one TPU chip, whose TensorCores JAX shows as one device from v4 on). float32 is
TF32 on Ampere and later GPUs, because XLA runs float32 dots in TF32 there by default
(`jax_default_matmul_precision`), and the plain FP32 peak where the part has no TF32 (V100, T4);
on TPUs XLA's default precision runs float32 dots as one bfloat16 pass: the bfloat16 peak.
None where the part has no such peak (bfloat16 before Ampere, float16 on TPUs).

Sources: NVIDIA's datasheets (V100, T4, A100, A10, L4, L40, L40S, H100 SXM / PCIe / NVL, H200,
B200; the sparsity figures halved) and Google Cloud's TPU documentation (system architecture:
v4, v5e, v5p, v6e per-chip bf16 peaks).

A part is found by the longest of its names that occurs in a `jax.devices()[0].device_kind`
("NVIDIA H100 PCIe" -> "H100 PCIe", not "H100") or in a short name for planning ("h200",
"A100"), as whole words and ignoring case ("A10" does not match "A100-SXM4-80GB").
"""
from __future__ import annotations

import re

DTYPES = ("bfloat16", "float16", "float32")


def _gpu(half: float | None, f32: float, fp16: float | None = None) -> dict[str, float | None]:
    """bfloat16 `half` (None: no bfloat16), float16 `fp16` (default: `half`), float32 `f32`."""
    return {"bfloat16": half, "float16": half if fp16 is None else fp16, "float32": f32}


def _tpu(bf16: float) -> dict[str, float | None]:
    return {"bfloat16": bf16, "float16": None, "float32": bf16}


# name in device_kind -> dtype -> FLOP/s. The SXM / mezzanine part where not named otherwise.
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "B200": _gpu(2250e12, 1100e12),
    "H200": _gpu(989e12, 494.7e12),
    "GH200": _gpu(989e12, 494.7e12),
    "H200 NVL": _gpu(835e12, 417.5e12),
    "H100": _gpu(989e12, 494.7e12),
    "H100 PCIe": _gpu(756e12, 378e12),
    "H100 NVL": _gpu(835e12, 417.5e12),
    "A100": _gpu(312e12, 156e12),
    "L40S": _gpu(362e12, 183e12),
    "L40": _gpu(181e12, 90.5e12),
    "L4": _gpu(121e12, 60e12),
    "A10": _gpu(125e12, 62.5e12),
    "V100": _gpu(None, 15.7e12, fp16=125e12),
    "V100-PCIE": _gpu(None, 14e12, fp16=112e12),
    "V100S": _gpu(None, 16.4e12, fp16=130e12),
    "T4": _gpu(None, 8.1e12, fp16=65e12),
    "TPU v4": _tpu(275e12),
    "TPU v5 lite": _tpu(197e12),  # v5e
    "TPU v5": _tpu(459e12),  # v5p
    "TPU v6 lite": _tpu(918e12),  # v6e
}
# Other names of those parts: marketing names, AWS's A10G (an A10).
ALIASES = {"v4": "TPU v4", "v5e": "TPU v5 lite", "TPU v5e": "TPU v5 lite", "v5p": "TPU v5",
           "TPU v5p": "TPU v5", "v6e": "TPU v6 lite", "TPU v6e": "TPU v6 lite", "A10G": "A10"}


def part(device_kind: str) -> str | None:
    """The PEAK_FLOPS name for a device kind or short name; None for unknown parts (CPUs)."""
    found = [name for name in known_names()
             if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", device_kind, re.IGNORECASE)]
    longest = max(found, key=len, default=None)
    return ALIASES.get(longest, longest)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one `device_kind` device computing in `dtype` (None: unknown part,
    or no such peak)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    name = part(device_kind)
    return None if name is None else PEAK_FLOPS[name][dtype]


def known_names() -> list[str]:
    """The names `part` recognises (for error messages)."""
    return [*PEAK_FLOPS, *ALIASES]


def this_device_kind() -> str:
    """`jax.devices()[0].device_kind` of this machine ('cpu' on a CPU)."""
    import jax  # here, so that the table imports without starting a backend
    return jax.devices()[0].device_kind
