"""The bfloat16 rounding kernel equals its reference (and torch's own cast) bit for bit."""
import numpy as np
import pytest
import torch

from companion import runtime
from companion.kernels import round_to_bf16, round_to_bf16_reference

DEVICE = runtime.kernel_device()

SPECIALS = np.array(
    [
        0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
        1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-23,  # tie to even (down), tie (up), just above a tie
        np.finfo(np.float32).max, np.finfo(np.float32).tiny, np.finfo(np.float32).smallest_subnormal,
        3.3895313892515355e38,  # largest bf16; anything halfway above it rounds to Inf
    ],
    dtype=np.float32,
)


def random_float32(n: int, seed: int) -> torch.Tensor:
    """Random bit patterns: every sign, exponent and mantissa, NaNs and subnormals included."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32))


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    g, w = got.cpu().view(torch.int16), want.cpu().view(torch.int16)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} codes differ, first at {bad[0].tolist()}"


@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (3, 333), (1025,), (2, 0), (0,)])
def test_matches_reference_on_ragged_shapes(shape):
    x = random_float32(int(np.prod(shape)), seed=len(shape) * 1000 + sum(shape)).reshape(shape)
    x[..., :1] = 1.0 + 2**-8  # a tie in every row
    assert_bits_equal(round_to_bf16(x.to(DEVICE)), round_to_bf16_reference(x))


def assert_equals_torch_cast(got: torch.Tensor, x: torch.Tensor) -> None:
    """torch's cast is an independent oracle except for NaN payloads, which it leaves unspecified
    (its CPU and GPU paths give different NaN patterns); there we only demand a NaN."""
    want = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    assert torch.isnan(got[nan]).all()
    assert_bits_equal(got[~nan], want[~nan])


def test_special_values_match_reference_and_torch():
    x = torch.from_numpy(np.concatenate([SPECIALS, -SPECIALS]))
    got = round_to_bf16(x.to(DEVICE))
    assert_bits_equal(got, round_to_bf16_reference(x))
    assert_equals_torch_cast(got.cpu(), x)
    assert (got.cpu().view(torch.int16)[torch.isnan(x)] == 0x7FC0).all()  # the canonical quiet NaN


def test_ties_round_to_even_by_hand():
    # 1 + 2^-8 lies halfway between bf16 1.0 (0x3F80) and 1.0078125 (0x3F81): even is 0x3F80.
    # 1 + 3·2^-8 lies halfway between 0x3F81 and 0x3F82: even is 0x3F82. The float32 max rounds to Inf.
    x = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 3.4028234663852886e38], dtype=torch.float32)
    codes = round_to_bf16(x.to(DEVICE)).cpu().view(torch.int16).tolist()
    assert codes == [0x3F80, 0x3F82, 0x7F80]


def test_bad_input_is_refused_clearly():
    x = torch.ones(4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="dtype float16"):
        round_to_bf16(x.half())
    with pytest.raises(ValueError, match="contiguous"):
        round_to_bf16(x.t()[:, ::2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        round_to_bf16(np.ones(3, dtype=np.float32))


@pytest.mark.gpu
def test_compiled_kernel_on_many_random_floats():
    x = random_float32(1 << 24, seed=7).to("cuda")
    got = round_to_bf16(x)
    assert_equals_torch_cast(got, x)
    assert_bits_equal(got[: 1 << 16], round_to_bf16_reference(x[: 1 << 16]))
