"""The drawing helpers of companion.book.figures: they draw, label the right fields, and refuse bad input."""
import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed

import matplotlib.pyplot as plt
import numpy as np
import pytest

from companion.book import figures
from companion.formats import UnknownFormatError, get_format


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_bit_layout_of_a_value_labels_each_field(ax):
    fields = figures.plot_bit_layout(ax, "fp32", 1.0)
    texts = _texts(ax)
    assert fields.code == 0x3F800000
    # One box per bit, in order, each holding its bit.
    assert len(ax.patches) == 32
    assert "".join(t for t in texts if t in ("0", "1"))[:32] == format(0x3F800000, "032b")
    for label in ("sign", "exponent (8)", "mantissa (23)", "= 0", "= 127"):
        assert label in texts
    assert ax.get_title(loc="left") == str(fields)
    colours = {matplotlib.colors.to_hex(p.get_facecolor()) for p in ax.patches}
    assert colours == {figures.FIELD_COLOURS[f].lower() for f in ("sign", "exponent", "mantissa")}


def test_bit_layout_of_a_code_and_short_labels_for_narrow_fields(ax):
    fields = figures.plot_bit_layout(ax, "fp4_e2m1", code=0b1101, title=False)
    texts = _texts(ax)
    assert fields.value == -3.0
    assert ["sign", "E (2)", "M (1)"] == [t for t in texts if t in ("sign", "E (2)", "M (1)")]
    assert [t for t in texts if t in ("0", "1")] == list("1101")
    assert ax.get_title(loc="left") == ""


def test_bit_layout_of_an_integer(ax):
    fields = figures.plot_bit_layout(ax, "int8", -3)
    assert fields.bits == "11111101" and len(ax.patches) == 8
    assert "two's complement integer (8)" in _texts(ax) and "= -3" in _texts(ax)


def test_bit_layout_rejects_bad_input(ax):
    with pytest.raises(TypeError, match="exactly one of"):
        figures.plot_bit_layout(ax, "fp8_e4m3")
    with pytest.raises(TypeError, match="exactly one of"):
        figures.plot_bit_layout(ax, "fp8_e4m3", 1.0, code=0x38)
    with pytest.raises(UnknownFormatError):
        figures.plot_bit_layout(ax, "fp7", 1.0)
    with pytest.raises(ValueError, match="must lie in"):
        figures.plot_bit_layout(ax, "fp8_e4m3", code=256)
    with pytest.raises(ValueError, match="one value"):
        figures.plot_bit_layout(ax, "fp8_e4m3", [1.0, 2.0])


def test_number_line_draws_every_value_in_range(ax):
    shown = figures.plot_number_line(ax, "fp8_e4m3", -1, 1)
    values = get_format("fp8_e4m3").values()
    np.testing.assert_array_equal(shown, values[np.abs(values) <= 1])
    drawn = sum(len(c.get_segments()) for c in ax.collections)
    assert drawn == len(shown) == 113
    # Subnormals go in their own, lighter collection: 7 on each side of zero.
    assert [len(c.get_segments()) for c in ax.collections] == [113 - 14, 14]


def test_number_line_log_scale_keeps_positive_values(ax):
    shown = figures.plot_number_line(ax, "fp4_e2m1", 0.25, 8, log=True)
    assert shown.tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert ax.get_xscale() == "log"


def test_number_line_rejects_bad_input(ax):
    with pytest.raises(ValueError, match="lo < hi"):
        figures.plot_number_line(ax, "fp8_e4m3", 1, -1)
    with pytest.raises(ValueError, match="lo < hi"):
        figures.plot_number_line(ax, "fp8_e4m3", 0, math.inf)
    with pytest.raises(ValueError, match="lo > 0"):
        figures.plot_number_line(ax, "fp8_e4m3", 0, 1, log=True)
    with pytest.raises(ValueError, match="enumerates formats"):
        figures.plot_number_line(ax, "fp32", 0, 1)


@pytest.mark.parametrize(
    "name, x, expected",
    [
        ("fp32", 1.0, 2.0**-23),
        ("fp32", 1.5, 2.0**-23 / 1.5),
        ("bf16", 3.0, 2.0**-6 / 3.0),
        ("fp8_e4m3", 448.0, 32 / 448),       # the largest value: the gap below it
        ("fp8_e4m3", 2.0**-9, 1.0),          # the smallest subnormal: the next value is twice it
        ("fp8_e5m2", 1.1, 0.25 / 1.1),       # between values: the gap of the neighbours around x
        ("fp4_e2m1", 5.0, 2.0 / 5.0),
        ("int8", 3.0, 1 / 3.0),
        ("fp64", 1.0, 2.0**-52),
    ],
)
def test_relative_spacing(name, x, expected):
    assert figures.relative_spacing(name, np.array([x]))[0] == expected


def test_relative_spacing_rejects_values_outside_the_format():
    for bad in (0.0, -1.0, 449.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="0 < x <= max"):
            figures.relative_spacing("fp8_e4m3", np.array([1.0, bad]))


def test_plot_relative_spacing_spans_the_format(ax):
    fmt = get_format("fp8_e5m2")
    x, spacing = figures.plot_relative_spacing(ax, fmt, num=500)
    assert (x[0], x[-1]) == (fmt.min_subnormal, fmt.max) and len(x) == 500
    assert spacing[0] == 1.0 and spacing.min() > 2.0**-3
    assert ax.get_lines()[0].get_label() == "fp8_e5m2"
    assert ax.get_xscale() == ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="lo < hi"):
        figures.plot_relative_spacing(ax, fmt, 2.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        figures.plot_relative_spacing(ax, fmt, -1.0, 1.0)
