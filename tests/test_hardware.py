"""lm.hardware: datasheet peaks found from real device_kind strings and short names."""
import pytest

from lm import hardware


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),       # the longer name wins over "H100"
    ("NVIDIA H100 PCIe", "float32", 378e12),        # TF32
    ("NVIDIA H200", "float16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("NVIDIA A10G", "bfloat16", 125e12),            # not the A100
    ("NVIDIA L40S", "bfloat16", 362e12),            # not the L4
    ("Tesla V100-SXM2-16GB", "bfloat16", None),     # no bfloat16 before Ampere
    ("Tesla V100-SXM2-16GB", "float16", 125e12),
    ("Tesla V100-SXM2-16GB", "float32", 15.7e12),   # no TF32: the FP32 peak
    ("Tesla T4", "float16", 65e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),            # v5e
    ("TPU v5", "bfloat16", 459e12),                 # v5p
    ("TPU v6 lite", "bfloat16", 918e12),            # v6e
    ("TPU v5 lite", "float16", None),
    ("cpu", "bfloat16", None),
    ("TFRT_CPU_0", "float32", None),
])
def test_peak_of_device_kinds(kind, dtype, peak):
    assert hardware.peak_flops(kind, dtype) == peak


@pytest.mark.parametrize("name,part", [("A100", "A100"), ("h200", "H200"), ("H100", "H100"),
                                       ("h100 pcie", "H100 PCIe"), ("v5e", "TPU v5 lite"),
                                       ("V6E", "TPU v6 lite"), ("a10g", "A10"), ("M2", None)])
def test_short_names_for_planning(name, part):
    assert hardware.part(name) == part


def test_an_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="unknown compute dtype 'float8'; valid: bfloat16"):
        hardware.peak_flops("NVIDIA H100 80GB HBM3", "float8")
