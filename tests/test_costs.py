"""companion.costs against values computed by hand."""
from fractions import Fraction

import numpy as np
import pytest

from companion import costs


def test_element_bits_come_from_the_formats():
    assert costs.element_bits("fp32") == 32
    assert costs.element_bits("bf16") == 16
    assert costs.element_bits("fp8_e4m3") == 8
    assert costs.element_bits("fp4_e2m1") == 4
    assert costs.element_bits("int4") == 4
    # Block formats are passed as bits per element: MXFP4 = 4 + 8/32.
    assert costs.element_bits(Fraction(17, 4)) == Fraction(17, 4)
    for bad in (0, -4, True, None, [8]):
        with pytest.raises(TypeError):
            costs.element_bits(bad)


def test_storage_bytes():
    assert costs.storage_bytes(7_000_000_000, "bf16") == 14e9
    assert costs.storage_bytes(7_000_000_000, "fp32") == 28e9
    assert costs.storage_bytes(10, "fp4_e2m1") == 5.0
    assert costs.storage_bytes(32, Fraction(17, 4)) == 17.0  # one MXFP4 block: 16 bytes + 1 scale byte
    assert costs.storage_bytes(0, "fp8_e5m2") == 0.0
    with pytest.raises(ValueError):
        costs.storage_bytes(-1, "bf16")


def test_elementwise_intensity():
    # z = x + y in bf16: 1 FLOP per 2 + 2 + 2 bytes.
    assert costs.elementwise_intensity("bf16") == pytest.approx(1 / 6, rel=1e-15)
    assert costs.elementwise_intensity("fp32", inputs=1, outputs=1) == 1 / 8
    # fp8 in, bf16 out, 3 FLOPs per element: 3 / (2·1 + 2).
    assert costs.elementwise_intensity("fp8_e4m3", out_format="bf16", flops_per_element=3) == 3 / 4


def test_gemm_flops_bytes_and_intensity():
    assert costs.gemm_flops(2, 3, 4) == 48
    # A 2×4, B 4×3, C 2×3 in bf16: (8 + 12 + 6)·2 bytes.
    assert costs.gemm_bytes(2, 3, 4, "bf16") == 52
    assert costs.gemm_bytes(2, 3, 4, "fp8_e4m3", "fp8_e4m3", "bf16") == 8 + 12 + 12
    # Square bf16 GEMM: 2n^3 / (3·2n^2) = n/3.
    assert costs.gemm_intensity(4096, 4096, 4096, "bf16") == pytest.approx(4096 / 3, rel=1e-15)
    # FP8 inputs, bf16 output: 2n^3 / (n^2·(1 + 1 + 2)) = n/2.
    assert costs.gemm_intensity(4096, 4096, 4096, "fp8_e4m3", "fp8_e4m3", "bf16") == 2048
    m = np.array([1, 4096])
    np.testing.assert_allclose(costs.gemm_intensity(m, 4096, 4096, "bf16"),
                               [2 * 4096**2 / (2 * (4096 + 4096**2 + 4096)), 4096 / 3], rtol=1e-15)


def test_tile_bytes_per_flop():
    # a 128 x 128 FP8 tile: 256 bytes per step of K for 2 * 128 * 128 FLOPs
    assert costs.tile_bytes_per_flop(128, 128, "fp8_e4m3") == 256 / 32768
    assert costs.tile_bytes_per_flop(128, 256, "fp8_e4m3") / costs.tile_bytes_per_flop(128, 128, "fp8_e4m3") == 0.75
    assert costs.tile_bytes_per_flop(64, 128, "bf16", "fp8_e4m3") == (64 * 2 + 128) / (2 * 64 * 128)


def test_gemv_intensity():
    n = k = 4096
    # bf16 weights, bf16 x and y: 2nk FLOPs over 2(k + nk + n) bytes, just under 1 FLOP/byte.
    assert costs.gemv_intensity(n, k, "bf16") == pytest.approx(2 * n * k / (2 * (k + n * k + n)), rel=1e-15)
    # fp4 weights with bf16 activations: half a byte per weight, nearly 4 FLOPs/byte.
    fp4 = costs.gemv_intensity(n, k, "fp4_e2m1", "bf16")
    assert fp4 == pytest.approx(2 * n * k / (2 * k + n * k / 2 + 2 * n), rel=1e-15)
    assert 3.99 < fp4 < 4


def test_roofline():
    assert costs.ridge_point(1e15, 4e12) == 250
    np.testing.assert_array_equal(costs.attainable_flops([1, 250, 1000], 1e15, 4e12), [4e12, 1e15, 1e15])
    assert costs.roofline_time(2e12, 1e9, 1e15, 1e12) == 2e-3   # compute-bound
    assert costs.roofline_time(1e9, 4e9, 1e15, 1e12) == 4e-3    # memory-bound


def test_significands_and_partial_products():
    expected = {"fp32": 24, "tf32": 11, "fp16": 11, "bf16": 8, "fp8_e4m3": 4, "fp8_e5m2": 3,
                "fp6_e2m3": 4, "fp6_e3m2": 3, "fp4_e2m1": 2, "e8m0": 1, "int8": 8, "int4": 4}
    for name, bits in expected.items():
        assert costs.significand_bits(name) == bits, name
    assert costs.partial_products("fp32") == 576
    assert costs.partial_products("fp16") == 121
    assert costs.partial_products("bf16") == 64
    assert costs.partial_products("fp8_e4m3") == 16
    assert costs.partial_products("fp4_e2m1") == 4
    assert costs.partial_products("bf16", "fp8_e4m3") == 32


def test_transformer_block_flops_by_hand():
    # seq 2, hidden 4, 2 heads of size 2, intermediate 8.
    got = costs.transformer_block_flops(2, 4, 2, 8)
    assert got == {
        "QKV projections": 3 * 2 * 2 * 4 * 4,          # 3 GEMMs of 2×4 @ 4×4
        "attention scores QKᵀ": 2 * (2 * 2 * 2 * 2),  # per head 2×2 @ 2×2
        "attention × V": 2 * (2 * 2 * 2 * 2),
        "output projection": 2 * 2 * 4 * 4,
        "MLP matmuls": 2 * (2 * 2 * 8 * 4),            # up and down
    }
    swiglu = costs.transformer_block_flops(2, 4, 2, 8, mlp="swiglu", batch=3)
    assert swiglu["MLP matmuls"] == 3 * 3 * (2 * 2 * 8 * 4)
    assert swiglu["attention scores QKᵀ"] == 3 * got["attention scores QKᵀ"]
    with pytest.raises(ValueError):
        costs.transformer_block_flops(2, 5, 2, 8)
    with pytest.raises(ValueError):
        costs.transformer_block_flops(2, 4, 2, 8, mlp="relu")


def test_llama_sizes():
    # LLaMA's SwiGLU widths: 2/3 · 4d rounded up to a multiple of 256.
    assert [costs.llama_intermediate_size(d) for d in (4096, 5120, 6656, 8192)] == [11008, 13824, 17920, 22016]
    seven = costs.llama_parameters(4096, 32, 32000)
    assert seven["layers"] == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)
    assert seven["embedding"] == seven["output head"] == 32000 * 4096
    assert seven["total"] == 6_738_415_616
    assert costs.llama_parameters(5120, 40, 32000)["total"] == 13_015_864_320
