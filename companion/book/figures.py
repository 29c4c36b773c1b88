"""The figure style shared by every chapter, and small drawing helpers."""
from __future__ import annotations

import math

import matplotlib
import numpy as np

# Colours chosen to stay distinct in print and for the common forms of colour blindness (Okabe–Ito).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]

STYLE = {
    "figure.figsize": (7.0, 3.6),
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "figure.autolayout": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply the book's matplotlib style (idempotent)."""
    matplotlib.rcParams.update(STYLE)


# --------------------------------------------------------------------------
# Number formats: bit layouts, number lines, spacing
# --------------------------------------------------------------------------

# One colour per field of a bit pattern; the same colours in every chapter.
FIELD_COLOURS = {"sign": "#CC79A7", "exponent": "#56B4E9", "mantissa": "#E69F00", "integer": "#009E73"}


def plot_bit_layout(ax, fmt, x=None, *, code=None, title=True):
    """Draw one code of ``fmt`` as a row of boxes, one per bit, coloured by field.

    Exactly one of ``x`` (a value, encoded with the format's default rounding) or ``code`` is
    given, as for :func:`companion.formats.bit_fields`. Each field is labelled with its name and
    width above the boxes and its unsigned value below; with ``title`` the axes title shows the
    format, the field formula and the decoded value. Returns the ``BitFields`` drawn.
    """
    from matplotlib.patches import Rectangle

    from companion.formats import IntFormat, bit_fields, get_format

    fmt = get_format(fmt)
    fields = bit_fields(fmt, x, code=code)
    if isinstance(fmt, IntFormat):
        kind = "two's complement" if fmt.signed else "unsigned"
        runs = [("integer", fields.bits, f"{kind} integer ({fmt.bits})", int(fields.value))]
    else:
        # Fields narrower than their name get the short label, so neighbouring labels don't collide.
        runs = [
            ("sign", fields.sign, "sign", fields.sign_value),
            ("exponent", fields.exponent,
             f"{'exponent' if fmt.exp_bits >= 4 else 'E'} ({fmt.exp_bits})", fields.exponent_value),
            ("mantissa", fields.mantissa,
             f"{'mantissa' if fmt.man_bits >= 4 else 'M'} ({fmt.man_bits})", fields.mantissa_value),
        ]
    position = 0
    for field, bits, label, value in runs:
        if not bits:
            continue
        for i, bit in enumerate(bits):
            ax.add_patch(Rectangle((position + i, 0), 1, 1, facecolor=FIELD_COLOURS[field],
                                   edgecolor="white", linewidth=1.5))
            ax.text(position + i + 0.5, 0.5, bit, ha="center", va="center", fontsize=9,
                    family="monospace")
        middle = position + len(bits) / 2
        ax.text(middle, 1.15, label, ha="center", va="bottom", fontsize=8)
        ax.text(middle, -0.15, f"= {value}", ha="center", va="top", fontsize=8, color="0.3")
        position += len(bits)
    ax.set_xlim(-0.2, max(position, 8) + 0.2)
    ax.set_ylim(-0.9, 1.9)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(str(fields), fontsize=9, loc="left", family="monospace")
    return fields


def _checked_range(lo, hi):
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"need finite lo < hi, got lo={lo!r}, hi={hi!r}")


def plot_number_line(ax, fmt, lo, hi, *, y=0.0, log=False, height=0.35, color=None, label=None):
    """Mark every finite value of ``fmt`` in [lo, hi] with a vertical tick at height ``y``.

    Subnormals are drawn in a lighter shade of the colour. With ``log`` the axis is log2 and only
    positive values are drawn (lo must then be positive). Returns the values drawn, ascending.
    The format must be narrow enough to enumerate (``fmt.values()``), at most 20 bits.
    """
    from companion.formats import FloatFormat, get_format

    fmt = get_format(fmt)
    _checked_range(lo, hi)
    if log and lo <= 0:
        raise ValueError(f"a log-scale number line needs lo > 0, got {lo!r}")
    values = fmt.values()
    shown = values[(values >= lo) & (values <= hi)]
    color = PALETTE[0] if color is None else color
    subnormal = np.zeros(shown.shape, dtype=bool)
    if isinstance(fmt, FloatFormat) and fmt.subnormals:
        subnormal = (np.abs(shown) < fmt.min_normal) & (shown != 0)
    ax.vlines(shown[~subnormal], y - height / 2, y + height / 2, color=color, lw=0.8, label=label)
    if subnormal.any():
        ax.vlines(shown[subnormal], y - height / 2, y + height / 2, color=color, lw=0.8, alpha=0.4)
    if log:
        ax.set_xscale("log", base=2)
    return shown


def relative_spacing(fmt, x):
    """Gap from each positive finite ``x`` (float64 array) up to the next value of ``fmt``, over x.

    ``x`` is first rounded toward zero onto the format; the gap is then found from the codes alone
    (positive codes are ordered like their values, so the next value up has the next code). Where x
    lies in the top binade's last step (no next finite value) the gap below is used instead.
    """
    from companion.formats import get_format

    fmt = get_format(fmt)
    x = np.asarray(x, dtype=np.float64)
    if not (np.all(np.isfinite(x)) and np.all(x > 0) and np.all(x <= fmt.max)):
        raise ValueError(f"relative_spacing needs finite 0 < x <= max = {fmt.max!r} of {fmt.name}")
    code = fmt.encode(x, rounding="toward_zero").astype(np.uint64)
    low = fmt.decode(code)
    top = code >= fmt.encode(fmt.max)
    up = fmt.decode(np.where(top, code, code + np.uint64(1)))
    down = fmt.decode(np.where(top, code - np.uint64(1), code))
    gap = np.where(top, low - down, up - low)
    return gap / x


def plot_relative_spacing(ax, fmt, lo=None, hi=None, *, num=4000, color=None, label=None):
    """Plot :func:`relative_spacing` of ``fmt`` over ``num`` log-spaced points of [lo, hi].

    ``lo``/``hi`` default to the format's smallest positive and largest value. Both axes are log2.
    Returns ``(x, spacing)``.
    """
    from companion.formats import get_format

    fmt = get_format(fmt)
    lo = fmt.min_positive if lo is None else lo
    hi = fmt.max if hi is None else hi
    _checked_range(lo, hi)
    if lo <= 0:
        raise ValueError(f"relative spacing is drawn for positive values, got lo={lo!r}")
    x = np.exp2(np.linspace(np.log2(lo), np.log2(hi), num))
    x[0], x[-1] = lo, hi  # exact ends, free of log/exp2 round-off
    spacing = relative_spacing(fmt, x)
    ax.plot(x, spacing, lw=1.0, color=color, label=label if label is not None else fmt.name,
            drawstyle="steps-post")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    return x, spacing
