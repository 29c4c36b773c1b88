"""W4A16 for decoding: FP4 weights decoded in registers straight into the Tensor Core's warp-level MMA.

For M <= 16 on the GPU, ``_fp4_mma_gemv_kernel`` drives ``mma.sync`` from PTX with registers it fills
itself: each thread decodes the codes it loaded straight into the registers the MMA reads (the K order
is permuted so that this is possible, identically for both operands), so no decoded weight is moved
between threads or through shared memory. A code becomes a bf16 number by bit placement (three integer
instructions per pair of codes; the block scale absorbs the constant factor), with a byte-permute
lookup kept for MXFP4 scales outside 2^-111..2^9. Under the interpreter, which cannot run PTX, the same
kernel emulates the two MMAs on the same registers (each register reshaped across the lanes of its
warp), so CI checks its indexing. :func:`companion.kernels.fp4_gemm.w4a16_matmul` is the entry point;
this module also holds the pieces its other kernels share: the E2M1 lookup, the float32 decode used by
the interpreter, and the fixed-order sum of split-K partials.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from companion import runtime
from companion.kernels.float_codes import from_e8m0, round_for_store

@triton.jit
def _sum_splits_kernel(ws_ptr, c_ptr, M, N, stride_cm, stride_cn, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """C = the SPLIT_K partial sums added in a fixed order (deterministic), rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    c_ptrs = c_ptr + (offs // N).to(tl.int64) * stride_cm + (offs % N) * stride_cn
    tl.store(c_ptrs, round_for_store(acc, c_ptr), mask=mask)



@triton.jit
def _e2m1_value(nibble):
    """E2M1 code (int32, 0..15) -> its value as float32, by placing its bits under fp16's.

    Sign to bit 15, the two exponent bits and the mantissa bit to bits 11..9: the fp16 number is then
    the E2M1 value times 2^-14 (the subnormal 0.5 lands on fp16's subnormal 2^-15, so the one rule
    covers every code); widening to float32 and multiplying by 2^14 are exact.
    """
    bits = ((nibble & 8) << 12) | ((nibble & 7) << 9)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0



# Eight E2M1 codes (one 32-bit register of packed bytes) -> eight bf16 values, with byte permutes as
# lookup tables. A bf16 E2M1 value has one of eight high bytes and one of eight low bytes, so PRMT, which
# picks bytes out of an 8-byte pool by 3-bit indices, looks up four of each at once; the three magnitude
# bits of each nibble are the indices, and the sign bit picks 0x00 or 0x80 for the top bit.
#   magnitude: 0    0.5    1      1.5    2      3      4      6
#   bf16:      0000 3F00   3F80   3FC0   4000   4040   4080   40C0
# The lookup itself (low bytes in lo0/lo1, high bytes with the sign in hi0/hi1, for the nibbles of
# bytes 0-1 and 2-3), shared by the GEMV below and the NVFP4 decode kernel of companion.kernels.fp4_gemm;
# {src} is the input register.
_E2M1_LOOKUP_PTX = """
and.b32 mag, {src}, 0x77777777;
shr.u32 mag_hi, mag, 16;
and.b32 sgn, {src}, 0x88888888;
shr.u32 sgn_lo, sgn, 3;
shr.u32 sgn_hi, sgn, 19;
prmt.b32 lo0, 0xC0800000, 0xC0804000, mag;
prmt.b32 lo1, 0xC0800000, 0xC0804000, mag_hi;
prmt.b32 hi0, 0x3F3F3F00, 0x40404040, mag;
prmt.b32 hi1, 0x3F3F3F00, 0x40404040, mag_hi;
prmt.b32 s0, 0x00008000, 0, sgn_lo;
prmt.b32 s1, 0x00008000, 0, sgn_hi;
or.b32 hi0, hi0, s0;
or.b32 hi1, hi1, s1;
"""

@triton.jit
def _quarters(t):
    """(..., 4) -> its four (...) slices 0, 2, 1, 3 (register renaming: the last axis lies in one thread)."""
    a, b = tl.split(tl.reshape(t, t.shape[:-1] + [2, 2]))  # a: elements 0, 2; b: 1, 3
    a0, a2 = tl.split(a)
    b1, b3 = tl.split(b)
    return a0, a2, b1, b3


# The small-M kernel below runs the Tensor Core's warp-level MMA (mma.sync m16n8k16: a 16 x 16 BF16 tile
# of W times a 16 x 8 tile of X^T, FP32 sums) on registers it fills itself, so that no decoded weight
# leaves the thread that decoded it. Any permutation of K serves as long as both operands share it, and
# the one used here puts eight consecutive codes (one 32-bit word) where the MMA wants four BF16 pairs:
# in thread (g, q) of a warp (g = lane / 4, q = lane % 4), MMA number 2u takes the pairs (e0, e1) and
# (e2, e3) of word u and MMA 2u + 1 the pairs (e4, e5) and (e6, e7), for rows g and g + 8. The byte-
# permute lookup gives these pairs with other final selectors than fp4_gemm's decode kernel uses, and
# they are the activations' own pairs: the int32 pairs of bf16 read beside the word go to the MMA as they are.


# Two ways to decode. The lookup above gives each code's own bf16 value, for any block scale. The fast
# way places bits instead: a code's three magnitude bits put under bf16's two lowest exponent bits and
# its top mantissa bit (bits 8..6), and its sign at bit 15, make a bf16 number equal to the code's value
# times 2^-126 -- the codes 0 and 0.5 land on bf16 subnormals by the same rule, so no code is special.
# The low and high nibbles of a byte are the elements 2j and 2j + 1 of a pair: one byte permute puts
# the low nibbles' byte j at bits 0..7 and the high nibbles' byte j at bits 16..23 (zeros between),
# one multiplication by 0x1040 adds that word shifted by 6 (magnitudes to bits 8..6 and 24..22) to it
# shifted by 12 (signs to bits 15 and 31) -- the two copies share no bit, so nothing carries -- and one
# AND keeps those eight bits: three integer instructions per pair and no lookup constants. The 2^-126
# goes into the block scale, which multiplies the pair anyway: the scale times 2^118, a BF16 number for
# every E4M3 scale and for E8M0 scales from 2^-111 to 2^9 (others take the lookup), makes the products
# the weights times 2^-8 -- exact, like the lookup's -- and the FP32 sums are multiplied by 2^8 at the end.
_E2M1_PLACE_PTX = """and.b32 lo, {src}, 0x0F0F0F0F;
shr.u32 hi, {src}, 4;
and.b32 hi, hi, 0x0F0F0F0F;
"""
PAIR_SPREAD = tl.constexpr(0x1040)  # 2^6 + 2^12
PAIR_BITS = tl.constexpr(0x81C081C0)  # bits 31, 24..22, 15 and 8..6: the two placed codes
PLACED_EXPONENT = tl.constexpr(118)  # the fast decode's block scales are multiplied by 2^118, its sums by 2^8
# E8M0 codes the fast decode takes: scales 2^-111 .. 2^9, so that no scaled weight is a bf16 subnormal
FAST_E8M0_LO, FAST_E8M0_HI = tl.constexpr(16), tl.constexpr(136)

# INT4 (two's complement, -8..7) takes the same byte permute with one change: the nibbles are first
# XORed with 8, which makes them q + 8 in 0..15; ORed under the bf16 pattern of 128 (0x4300), a pair
# holds 128 + q + 8, exactly, and subtracting 136 leaves q. The group scale of 128 codes does not enter
# the MMA (q * s is not always a bf16 number): the MMAs of one group sum q * x into fresh FP32
# accumulators, which are then multiplied by the row's scale and added, once per group.
_INT4_PTX = """xor.b32 lo, {src}, 0x88888888;
shr.u32 hi, lo, 4;
and.b32 lo, lo, 0x0F0F0F0F;
and.b32 hi, hi, 0x0F0F0F0F;
"""
INT4_BIAS_PAIR = tl.constexpr(0x43004300)  # bf16 128.0 in both halves
INT4_OFFSET_PAIR = tl.constexpr(0x43084308)  # bf16 136.0 in both halves
INT4_GROUP = 128


def _decode_mma_ptx(token_tiles, decode="place"):
    """The decode-and-multiply block of _fp4_mma_gemv_kernel for 8 or 16 activation rows: outputs the
    4 * token_tiles accumulators, then inputs: the same accumulators, the words of rows g and g + 8,
    their scales (BF16 pairs), and four activation registers per tile of 8 activation rows. ``decode``:
    "place", the bit-placement decode (scales times 2^118); "lookup"; or "int4" (no scale: see above)."""
    n = 4 * token_tiles
    wg, wh, sg, sh = (f"${2 * n + i}" for i in range(4))
    selectors = ("0x8480", "0x9591", "0xA6A2", "0xB7B3")

    def decode_word(src, scale, out):  # pairs (e0, e1), (e2, e3), (e4, e5), (e6, e7) of the word, scaled
        if decode == "int4":
            return (_INT4_PTX.format(src=src)
                    + "".join(f"prmt.b32 {out}{i}, lo, hi, {sel};\n"
                              f"or.b32 {out}{i}, {out}{i}, {INT4_BIAS_PAIR.value:#x};\n"
                              f"sub.rn.bf16x2 {out}{i}, {out}{i}, offset;\n"
                              for i, sel in enumerate(selectors)))
        if decode == "place":
            return (_E2M1_PLACE_PTX.format(src=src)
                    + "".join(f"prmt.b32 {out}{i}, lo, hi, {sel};\n"
                              f"mul.lo.u32 {out}{i}, {out}{i}, {PAIR_SPREAD.value:#x};\n"
                              f"and.b32 {out}{i}, {out}{i}, {PAIR_BITS.value:#x};\n"
                              for i, sel in enumerate(selectors))
                    + "".join(f"mul.rn.bf16x2 {out}{i}, {out}{i}, {scale};\n" for i in range(4)))
        return (_E2M1_LOOKUP_PTX.format(src=src)
                + "".join(f"prmt.b32 {out}{i}, lo{i // 2}, hi{i // 2}, {sel};\n"
                          for i, sel in enumerate(("0x5140", "0x7362", "0x5140", "0x7362")))
                + "".join(f"mul.rn.bf16x2 {out}{i}, {out}{i}, {scale};\n" for i in range(4)))

    mma = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    regs = {"place": "lo, hi", "int4": "lo, hi, offset",
            "lookup": "mag, mag_hi, sgn, sgn_lo, sgn_hi, lo0, lo1, hi0, hi1, s0, s1"}[decode]
    body = ["{", f".reg .b32 {regs}, p0, p1, p2, p3, r0, r1, r2, r3;"]
    if decode == "int4":
        body.append(f"mov.b32 offset, {INT4_OFFSET_PAIR.value:#x};")
    body.append(decode_word(wg, sg, "p") + decode_word(wh, sh, "r"))
    for t in range(token_tiles):
        d = ", ".join(f"${4 * t + i}" for i in range(4))
        c = ", ".join(f"${n + 4 * t + i}" for i in range(4))
        b = [f"${2 * n + 4 + 4 * t + i}" for i in range(4)]
        body.append(f"{mma} {{{d}}}, {{p0, r0, p1, r1}}, {{{b[0]}, {b[1]}}}, {{{c}}};")
        body.append(f"{mma} {{{d}}}, {{p2, r2, p3, r3}}, {{{b[2]}, {b[3]}}}, {{{d}}};")
    return "\n".join(body + ["}"])


_E2M1_MMA_PTX = tl.constexpr(_decode_mma_ptx(1, "lookup"))
_E2M1_MMA16_PTX = tl.constexpr(_decode_mma_ptx(2, "lookup"))
_E2M1_PLACE_MMA_PTX = tl.constexpr(_decode_mma_ptx(1, "place"))
_E2M1_PLACE_MMA16_PTX = tl.constexpr(_decode_mma_ptx(2, "place"))
_INT4_MMA_PTX = tl.constexpr(_decode_mma_ptx(1, "int4"))
_INT4_MMA16_PTX = tl.constexpr(_decode_mma_ptx(2, "int4"))


@triton.jit
def _mma_gemv_loads(w_ptr, sw_ptr, rows_g, rows_h, q, seg, seg_hi, K, stride_wn, stride_sn, stride_sk,
                    NVFP4: tl.constexpr, INT4: tl.constexpr):
    """This thread's codes and block scales in one segment of 128 codes: 16 bytes (one 32-code chunk) of
    rows g and g + 8 as four int32 words each, and the scales of the chunk's blocks (for MXFP4 the
    chunk is one block, and the second pair repeats the first; for INT4 the segment is one group, and
    its bf16 scale comes as int16 bits)."""
    chunk = seg * 4 + q
    ok = (seg < seg_hi) & (chunk < K // 32)
    word = (4 * chunk)[:, None] + tl.arange(0, 4)[None, :]  # (T, 4)
    wg = tl.load(w_ptr + rows_g[:, None] * stride_wn + word, mask=ok[:, None], other=0)
    wh = tl.load(w_ptr + rows_h[:, None] * stride_wn + word, mask=ok[:, None], other=0)
    if NVFP4:  # blocks of 16: words 0, 1 and words 2, 3 of the chunk
        s_g = sw_ptr + rows_g * stride_sn + (2 * chunk) * stride_sk
        s_h = sw_ptr + rows_h * stride_sn + (2 * chunk) * stride_sk
        sg0 = tl.load(s_g, mask=ok, other=0)
        sg1 = tl.load(s_g + stride_sk, mask=ok, other=0)
        sh0 = tl.load(s_h, mask=ok, other=0)
        sh1 = tl.load(s_h + stride_sk, mask=ok, other=0)
    else:
        block = seg if INT4 else chunk
        sg0 = tl.load(sw_ptr + rows_g * stride_sn + block * stride_sk, mask=ok, other=0)
        sh0 = tl.load(sw_ptr + rows_h * stride_sn + block * stride_sk, mask=ok, other=0)
        sg1, sh1 = sg0, sh0
    return wg, wh, sg0, sg1, sh0, sh1


@triton.jit
def _scale_pair(s, NVFP4: tl.constexpr, PTX: tl.constexpr, FAST: tl.constexpr):
    """uint8 block scales -> BF16 pairs in int32 for mul.bf16x2 (exact: E8M0 and E4M3 values are BF16
    numbers), or as float32 for the interpreter's emulation. FAST: the scales times 2^118, for the
    bit-placement decode (E8M0: the bf16 pattern of 2^(e - 9), one multiply-add)."""
    if FAST and not NVFP4:  # scales outside FAST_E8M0_LO..HI give garbage here, unused (the program reruns)
        e = s.to(tl.int32)
        if PTX:
            return (e + PLACED_EXPONENT) * 0x00800080
        else:  # the same pattern, read as float32 (the clamp only keeps NumPy quiet about unused Inf)
            e = tl.minimum(tl.maximum(e, FAST_E8M0_LO), FAST_E8M0_HI)
            return _pair_value((e + PLACED_EXPONENT) * 0x00800080, False)
    if NVFP4:
        v = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = from_e8m0(s.to(tl.int32))
    if FAST:
        v = v * 2.0 ** PLACED_EXPONENT  # exact: every E4M3 scale times 2^118 is a BF16 number
    if PTX:
        bits = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return bits | (bits << 16)
    else:
        return v


@triton.jit
def _placed_pair(w, j: tl.constexpr):
    """The interpreter's version of the fast decode of byte j of a word (see _E2M1_PLACE_PTX): the pair
    (low nibble, high nibble) as bf16 patterns of value * 2^-126, in int32."""
    t = ((w >> (8 * j)) & 0x0F) | (((w >> (8 * j + 4)) & 0x0F) << 16)  # the byte permute
    return (t * PAIR_SPREAD) & (PAIR_BITS - 2 ** 32)  # as the PTX: int32 arithmetic wraps the same way


@triton.jit
def _int4_pair(w, j: tl.constexpr):
    """The interpreter's version of the INT4 decode of byte j of a word (see _INT4_PTX): the pair (low
    nibble, high nibble) as bf16 patterns of 128 + q + 8, in int32."""
    n = w ^ -0x77777778  # 0x88888888: q + 8 in every nibble
    return ((n >> (8 * j)) & 0x0F) | (((n >> (8 * j + 4)) & 0x0F) << 16) | INT4_BIAS_PAIR


@triton.jit
def _pair_value(pair, HIGH: tl.constexpr):
    """One bf16 of an int32 pair (the low one, or the high one) as float32: a shift or a mask, exact."""
    if HIGH:
        return (pair & -65536).to(tl.float32, bitcast=True)
    else:
        return (pair << 16).to(tl.float32, bitcast=True)


@triton.jit
def _mma_emulated(acc0, acc1, acc2, acc3, wg, wh, sg, sh, b0, b1, b2, b3, WARPS: tl.constexpr,
                  FAST: tl.constexpr, INT4: tl.constexpr):
    """The interpreter's stand-in for one block of _decode_mma_ptx (one tile of 8 activation rows): the
    same registers, decoded to float32 (scales ``sg``, ``sh`` as float32) and multiplied as the two
    mma.sync m16n8k16 define it -- lane (g, q) of a warp holds elements 0..7 of its word for K positions
    of rows g and g + 8, and the activations of the same positions for activation row g; an output
    (row r, activation row n) sums over the four lanes q of the warp. Lanes are regrouped by reshaping
    each (32 * WARPS,) register into (WARPS, g, q), so the sums cross lanes as the MMA does."""
    dg = tl.zeros((WARPS, 8, 8), dtype=tl.float32)  # (warp, row g, activation row n)
    dh = tl.zeros((WARPS, 8, 8), dtype=tl.float32)  # rows g + 8
    for i in tl.static_range(8):  # element i of the word: nibble i; its activation is half i % 2 of pair i // 2
        if i // 2 == 0:
            pair = b0
        elif i // 2 == 1:
            pair = b1
        elif i // 2 == 2:
            pair = b2
        else:
            pair = b3
        xv = tl.reshape(_pair_value(pair, i % 2 == 1), (WARPS, 1, 8, 4))
        if INT4:  # 128 + q + 8, minus 136: q itself (the group scale comes after the MMAs)
            ag = tl.reshape(_pair_value(_int4_pair(wg, i // 2), i % 2 == 1) - 136.0, (WARPS, 8, 1, 4))
            ah = tl.reshape(_pair_value(_int4_pair(wh, i // 2), i % 2 == 1) - 136.0, (WARPS, 8, 1, 4))
        else:
            if FAST:  # the placed bits, read as bf16 (value * 2^-126), times the scale * 2^118
                vg = _pair_value(_placed_pair(wg, i // 2), i % 2 == 1)
                vh = _pair_value(_placed_pair(wh, i // 2), i % 2 == 1)
            else:
                vg, vh = _e2m1_value((wg >> (4 * i)) & 0xF), _e2m1_value((wh >> (4 * i)) & 0xF)
            ag = tl.reshape(vg * sg, (WARPS, 8, 1, 4))
            ah = tl.reshape(vh * sh, (WARPS, 8, 1, 4))
        dg += tl.sum(ag * xv, axis=3)
        dh += tl.sum(ah * xv, axis=3)
    g0, g1 = tl.split(tl.reshape(dg, (WARPS, 8, 4, 2)))  # lane (g, q) keeps activation rows 2q, 2q + 1
    h0, h1 = tl.split(tl.reshape(dh, (WARPS, 8, 4, 2)))
    T: tl.constexpr = 32 * WARPS
    return (acc0 + tl.reshape(g0, (T,)), acc1 + tl.reshape(g1, (T,)), acc2 + tl.reshape(h0, (T,)),
            acc3 + tl.reshape(h1, (T,)))


@triton.jit
def _mma_step(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, w_g, w_h, s_g, s_h, b0, b1, b2, b3, b4, b5, b6,
              b7, TOKENS16: tl.constexpr, PTX: tl.constexpr, WARPS: tl.constexpr, FAST: tl.constexpr,
              INT4: tl.constexpr):
    """One word of codes per thread and row into the accumulators: compiled, one _decode_mma_ptx block
    (scales as BF16 pairs); interpreted, _mma_emulated (scales as float32)."""
    if PTX:
        if TOKENS16:
            if INT4:
                asm: tl.constexpr = _INT4_MMA16_PTX
            elif FAST:
                asm: tl.constexpr = _E2M1_PLACE_MMA16_PTX
            else:
                asm: tl.constexpr = _E2M1_MMA16_PTX
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = tl.inline_asm_elementwise(
                asm, "=f,=f,=f,=f,=f,=f,=f,=f,f,f,f,f,f,f,f,f,r,r,r,r,r,r,r,r,r,r,r,r",
                [acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, w_g, w_h, s_g, s_h, b0, b1, b2, b3,
                 b4, b5, b6, b7], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            if INT4:
                asm: tl.constexpr = _INT4_MMA_PTX
            elif FAST:
                asm: tl.constexpr = _E2M1_PLACE_MMA_PTX
            else:
                asm: tl.constexpr = _E2M1_MMA_PTX
            acc0, acc1, acc2, acc3 = tl.inline_asm_elementwise(
                asm, "=f,=f,=f,=f,f,f,f,f,r,r,r,r,r,r,r,r",
                [acc0, acc1, acc2, acc3, w_g, w_h, s_g, s_h, b0, b1, b2, b3],
                dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        acc0, acc1, acc2, acc3 = _mma_emulated(acc0, acc1, acc2, acc3, w_g, w_h, s_g, s_h, b0, b1, b2, b3, WARPS,
                                               FAST, INT4)
        if TOKENS16:
            acc4, acc5, acc6, acc7 = _mma_emulated(acc4, acc5, acc6, acc7, w_g, w_h, s_g, s_h, b4, b5, b6, b7,
                                                   WARPS, FAST, INT4)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _x_loads(x_base, x2_base, x_ok, x2_ok, offs, k_ok, u: tl.constexpr, TOKENS16: tl.constexpr):
    """The activations of word u of this thread's chunk, as (T, 4) int32 bf16 pairs, for activation rows
    g and (TOKENS16) g + 8."""
    xa = tl.load(x_base[:, None] + offs + 4 * u, mask=(k_ok & x_ok)[:, None], other=0)
    xb = xa  # unused unless TOKENS16
    if TOKENS16:
        xb = tl.load(x2_base[:, None] + offs + 4 * u, mask=(k_ok & x2_ok)[:, None], other=0)
    return xa, xb


@triton.jit
def _seg_loads(w_ptr, sw_ptr, rows_g, rows_h, rows_g2, rows_h2, q, seg, seg_hi, K, stride_wn, stride_sn, stride_sk,
               NVFP4: tl.constexpr, INT4: tl.constexpr, WARP_TILES: tl.constexpr):
    """The codes and scales one segment needs, as a tuple of two: those of rows g, g + 8 and (WARP_TILES
    = 2) of rows g + 16, g + 24."""
    w = _mma_gemv_loads(w_ptr, sw_ptr, rows_g, rows_h, q, seg, seg_hi, K, stride_wn, stride_sn, stride_sk, NVFP4,
                        INT4)
    v = w  # unused unless WARP_TILES == 2
    if WARP_TILES == 2:
        v = _mma_gemv_loads(w_ptr, sw_ptr, rows_g2, rows_h2, q, seg, seg_hi, K, stride_wn, stride_sn, stride_sk,
                            NVFP4, INT4)
    return w, v


@triton.jit
def _tile_scales(sg0, sg1, sh0, sh1, NVFP4: tl.constexpr, PTX: tl.constexpr, FAST: tl.constexpr,
                 INT4: tl.constexpr):
    """A tile's loaded scales as the MMA block wants them: BF16 pairs (or float32 under the
    interpreter), or for INT4 the group scales of rows g and g + 8 as float32 (twice)."""
    if INT4:
        return _int4_group_scale(sg0), _int4_group_scale(sg0), _int4_group_scale(sh0), _int4_group_scale(sh0)
    else:
        return (_scale_pair(sg0, NVFP4, PTX, FAST), _scale_pair(sg1, NVFP4, PTX, FAST),
                _scale_pair(sh0, NVFP4, PTX, FAST), _scale_pair(sh1, NVFP4, PTX, FAST))


@triton.jit
def _seg_compute(acc, bcc, outside, loads, x_base, x2_base, x_ok, x2_ok, q, seg, seg_hi, K,
                 NVFP4: tl.constexpr, WARPS: tl.constexpr, TOKENS16: tl.constexpr, PTX: tl.constexpr,
                 FAST: tl.constexpr, INT4: tl.constexpr, WARP_TILES: tl.constexpr):
    """One segment of 128 codes into the accumulators ``acc`` (eight, the tile of rows g, g + 8) and
    ``bcc`` (the second tile, WARP_TILES = 2), from the tuple ``loads`` of _seg_loads."""
    w, v = loads
    wg, wh, sg0, sg1, sh0, sh1 = w
    vg, vh, rg0, rg1, rh0, rh1 = v
    chunk = seg * 4 + q
    k_ok = (seg < seg_hi) & (chunk < K // 32)
    if FAST and not NVFP4 and not INT4:
        outside |= k_ok & _outside_fast(sg0, sh0)
        if WARP_TILES == 2:
            outside |= k_ok & _outside_fast(rg0, rh0)
    offs = (16 * chunk)[:, None] + tl.arange(0, 4)[None, :]  # (T, 4): the pairs of word 0 of the chunk
    sg0, sg1, sh0, sh1 = _tile_scales(sg0, sg1, sh0, sh1, NVFP4, PTX, FAST, INT4)
    rg0, rg1, rh0, rh1 = _tile_scales(rg0, rg1, rh0, rh1, NVFP4, PTX, FAST, INT4)
    t0, t1, t2, t3, t4, t5, t6, t7 = acc
    r0, r1, r2, r3, r4, r5, r6, r7 = bcc
    if INT4:  # the group's sums start from zero and are scaled into the accumulators after its MMAs
        z = tl.zeros_like(t0)
        t0, t1, t2, t3, t4, t5, t6, t7 = z, z, z, z, z, z, z, z
        r0, r1, r2, r3, r4, r5, r6, r7 = z, z, z, z, z, z, z, z
    wg0, wg2, wg1, wg3 = _quarters(wg)
    wh0, wh2, wh1, wh3 = _quarters(wh)
    vg0, vg2, vg1, vg3 = _quarters(vg)
    vh0, vh2, vh1, vh3 = _quarters(vh)
    for u in tl.static_range(4):
        if u == 0:
            w_g, w_h, v_g, v_h = wg0, wh0, vg0, vh0
        elif u == 1:
            w_g, w_h, v_g, v_h = wg1, wh1, vg1, vh1
        elif u == 2:
            w_g, w_h, v_g, v_h = wg2, wh2, vg2, vh2
        else:
            w_g, w_h, v_g, v_h = wg3, wh3, vg3, vh3
        s_g, s_h = (sg0, sh0) if u < 2 else (sg1, sh1)
        r_g, r_h = (rg0, rh0) if u < 2 else (rg1, rh1)
        xa, xb = _x_loads(x_base, x2_base, x_ok, x2_ok, offs, k_ok, u, TOKENS16)
        b0, b2, b1, b3 = _quarters(xa)
        b4, b6, b5, b7 = _quarters(xb)  # unused unless TOKENS16
        t0, t1, t2, t3, t4, t5, t6, t7 = _mma_step(
            t0, t1, t2, t3, t4, t5, t6, t7, w_g, w_h, s_g, s_h, b0, b1, b2, b3, b4, b5, b6, b7,
            TOKENS16, PTX, WARPS, FAST, INT4)
        if WARP_TILES == 2:  # the same activation registers, the second tile's codes
            r0, r1, r2, r3, r4, r5, r6, r7 = _mma_step(
                r0, r1, r2, r3, r4, r5, r6, r7, v_g, v_h, r_g, r_h, b0, b1, b2, b3, b4, b5, b6, b7,
                TOKENS16, PTX, WARPS, FAST, INT4)
    if INT4:  # accumulators 0, 1 (4, 5) belong to row g, 2, 3 (6, 7) to row g + 8
        acc = _int4_group_add(acc, (t0, t1, t2, t3, t4, t5, t6, t7), sg0, sh0)
        if WARP_TILES == 2:
            bcc = _int4_group_add(bcc, (r0, r1, r2, r3, r4, r5, r6, r7), rg0, rh0)
    else:
        acc = (t0, t1, t2, t3, t4, t5, t6, t7)
        if WARP_TILES == 2:
            bcc = (r0, r1, r2, r3, r4, r5, r6, r7)
    return acc, bcc, outside


@triton.jit
def _mma_k_loop(x_base, x2_base, x_ok, x2_ok, w_ptr, sw_ptr, rows_g, rows_h, rows_g2, rows_h2, q, warp, seg_lo,
                seg_hi, K, stride_wn, stride_sn, stride_sk, NVFP4: tl.constexpr, WARPS: tl.constexpr,
                TOKENS16: tl.constexpr, PTX: tl.constexpr, FAST: tl.constexpr, INT4: tl.constexpr,
                ROW_TILES: tl.constexpr, WARP_TILES: tl.constexpr):
    """The K loop of _fp4_mma_gemv_kernel: this thread's accumulators, as two tuples of eight (the tile
    of rows g, g + 8 and, WARP_TILES = 2, the tile of the 16 rows after it, whose MMAs take the same
    activation registers), and (FAST, MXFP4) whether any of its blocks had a scale outside
    FAST_E8M0_LO..FAST_E8M0_HI. ``warp`` counts within the thread's group of WARPS / ROW_TILES warps,
    which take the segments in turn; the next segment's codes and scales load while this one's are
    decoded and multiplied. (Two sets of loads in flight, the loop unrolled by two so that each set is
    reloaded in place, was slower on an H100 at N = K = 8192: 22.0 us against 16.8 at M = 1, MXFP4 -- the
    twelve more registers a thread cost a program slot per SM, and the 512 programs no longer fit in
    one wave.)"""
    STRIDE: tl.constexpr = WARPS // ROW_TILES
    T: tl.constexpr = 32 * WARPS
    zero = tl.zeros((T,), dtype=tl.float32)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero)
    bcc = (zero, zero, zero, zero, zero, zero, zero, zero)
    outside = tl.zeros((T,), dtype=tl.int1)
    loads = _seg_loads(w_ptr, sw_ptr, rows_g, rows_h, rows_g2, rows_h2, q, seg_lo + warp, seg_hi, K, stride_wn,
                       stride_sn, stride_sk, NVFP4, INT4, WARP_TILES)
    for seg0 in range(seg_lo, seg_hi, STRIDE):
        seg = seg0 + warp  # this warp's segment
        ahead = _seg_loads(w_ptr, sw_ptr, rows_g, rows_h, rows_g2, rows_h2, q, seg + STRIDE, seg_hi, K, stride_wn,
                           stride_sn, stride_sk, NVFP4, INT4, WARP_TILES)
        acc, bcc, outside = _seg_compute(acc, bcc, outside, loads, x_base, x2_base, x_ok, x2_ok, q, seg, seg_hi, K,
                                         NVFP4, WARPS, TOKENS16, PTX, FAST, INT4, WARP_TILES)
        loads = ahead
    return acc, bcc, outside


@triton.jit
def _outside_fast(sg, sh):
    """Whether either E8M0 scale of a pair of rows lies outside what the fast decode carries."""
    eg, eh = sg.to(tl.int32), sh.to(tl.int32)
    return (tl.minimum(eg, eh) < FAST_E8M0_LO) | (tl.maximum(eg, eh) > FAST_E8M0_HI)


@triton.jit
def _int4_group_scale(s):
    """An INT4 group scale, loaded as int16 bits of bf16, as float32."""
    return ((s.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _int4_group_add(acc, t, group_g, group_h):
    """One INT4 group's sums ``t`` into the accumulators, times the scales of rows g (accumulators 0, 1,
    4, 5) and g + 8 (2, 3, 6, 7)."""
    return (acc[0] + t[0] * group_g, acc[1] + t[1] * group_g, acc[2] + t[2] * group_h, acc[3] + t[3] * group_h,
            acc[4] + t[4] * group_g, acc[5] + t[5] * group_g, acc[6] + t[6] * group_h, acc[7] + t[7] * group_h)


@triton.jit
def _fp4_mma_gemv_kernel(
    x_ptr,  # activation pairs: bf16 (M, Kp) read as int32 (M, Kp / 2), M <= 16
    w_ptr, sw_ptr,  # packed E2M1 (N, Kp/2) read as int32 words (N, Kp/8); block scales (N, Kp/BLOCK) as uint8
    ts_ptr,  # float32 tensor scale (NVFP4; one element), unused for MXFP4
    c_ptr, ws_ptr,  # C (M, N); float32 partial sums (SPLIT_K, M, N) when K is split
    M, N, K,  # K counts elements (codes), a multiple of 32
    stride_xm, stride_wn, stride_sn, stride_sk, stride_cm, stride_cn,
    NVFP4: tl.constexpr,  # E4M3 scales per 16 and a tensor scale (True) or E8M0 scales per 32 (False)
    INT4: tl.constexpr,  # instead: two's complement INT4 codes, a bf16 scale per group of 128 (int16 bits)
    WARPS: tl.constexpr,  # warps per program (num_warps); they take the K segments of 128 in turn
    SPLIT_K: tl.constexpr,
    TOKENS16: tl.constexpr,  # M > 8: a second tile of 8 activation rows, with its own accumulators
    ROW_TILES: tl.constexpr,  # groups of WARPS / ROW_TILES warps per program, each with its own weight rows
    WARP_TILES: tl.constexpr,  # tiles of 16 weight rows per warp (1 or 2): each group's rows are 16 WARP_TILES
    PTX: tl.constexpr,  # compiled for the GPU (False under the interpreter: the MMAs emulated)
):
    """C = X W^T for up to 16 activation rows on the Tensor Cores, with the weights decoded in the
    registers of the threads that load them (see _decode_mma_ptx): C^T = W X^T, 16 rows of W by 8 rows
    of X per MMA. Per segment of 128 codes a thread loads 16 bytes (one MXFP4 block or two NVFP4
    blocks) of rows g and g + 8 and the activations of its K positions for activation rows g (and
    g + 8), and adds eight MMAs per tile of 8 activation rows into its FP32 accumulators; the next
    segment's codes and scales are loaded before this one is decoded. The warps' sums are added once,
    after the K loop.

    With ROW_TILES = 2 the warps form two groups, one per tile of 16 weight rows, that walk the same
    segments at the same pace: the second group's activation loads find the lines the first group's
    brought into L1, so the activations cross from L2 once per 32 weight rows instead of once per 16 --
    for M = 16 they are four times the bytes of the weights a program reads. With WARP_TILES = 2 each warp
    takes two tiles of 16 weight rows and feeds the activation registers it loads to both tiles' MMAs,
    which halves the activation loads per code without relying on L1 (the default for M > 8).

    The codes are decoded by bit placement (the fast decode); an MXFP4 program that meets a block
    scale outside FAST_E8M0_LO..FAST_E8M0_HI, which that decode cannot carry, runs its K loop again
    with the lookup."""
    T: tl.constexpr = 32 * WARPS
    GROUP: tl.constexpr = WARPS // ROW_TILES
    ROWS: tl.constexpr = 16 * WARP_TILES  # weight rows per group of warps
    lane = tl.arange(0, T)
    g = (lane % 32) // 4
    q = lane % 4
    warp = (lane // 32) % GROUP  # within its group
    rows = tl.program_id(0) * (ROWS * ROW_TILES) + (lane // (32 * GROUP)) * ROWS + g
    rows_g = tl.where(rows < N, rows, 0).to(tl.int64)
    rows_h = tl.where(rows + 8 < N, rows + 8, 0).to(tl.int64)
    rows_g2 = tl.where(rows + 16 < N, rows + 16, 0).to(tl.int64)  # the second tile (WARP_TILES = 2)
    rows_h2 = tl.where(rows + 24 < N, rows + 24, 0).to(tl.int64)
    x_ok, x2_ok = g < M, g + 8 < M
    x_base = x_ptr + tl.where(x_ok, g, 0) * stride_xm
    x2_base = x_ptr + tl.where(x2_ok, g + 8, 0) * stride_xm
    segs = tl.cdiv(K, 128)
    per_split = tl.cdiv(tl.cdiv(segs, SPLIT_K), GROUP) * GROUP
    seg_lo = tl.program_id(1) * per_split
    seg_hi = tl.minimum(segs, seg_lo + per_split)
    acc, bcc, outside = _mma_k_loop(x_base, x2_base, x_ok, x2_ok, w_ptr, sw_ptr, rows_g, rows_h, rows_g2, rows_h2, q,
                                    warp, seg_lo, seg_hi, K, stride_wn, stride_sn, stride_sk, NVFP4, WARPS, TOKENS16,
                                    PTX, True, INT4, ROW_TILES, WARP_TILES)
    if INT4:
        unscale = 1.0
    else:
        unscale = 2.0 ** (126 - PLACED_EXPONENT)  # the fast decode's products are the weights times 2^-8
    if not NVFP4 and not INT4:
        if tl.max(outside.to(tl.int32), axis=0) > 0:
            acc, bcc, outside = _mma_k_loop(x_base, x2_base, x_ok, x2_ok, w_ptr, sw_ptr, rows_g, rows_h, rows_g2,
                                            rows_h2, q, warp, seg_lo, seg_hi, K, stride_wn, stride_sn, stride_sk, NVFP4,
                                            WARPS, TOKENS16, PTX, False, INT4, ROW_TILES, WARP_TILES)
            unscale = 1.0
    # the warps' partial sums, added in a fixed order, then stored: accumulators 0, 1 hold W row g
    # times activation rows 2q, 2q + 1, accumulators 2, 3 W row g + 8 (4..7 the same for rows 8 + 2q..)
    l32 = tl.arange(0, ROW_TILES * 32)  # (group, lane) of a warp
    r = tl.program_id(0) * (ROWS * ROW_TILES) + (l32 // 32) * ROWS + (l32 % 32) // 4
    col = 2 * (l32 % 4)
    ts = (tl.load(ts_ptr) if NVFP4 else 1.0) * unscale
    _store_tile(acc, ts, c_ptr, ws_ptr, r, col, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES, TOKENS16)
    if WARP_TILES == 2:
        _store_tile(bcc, ts, c_ptr, ws_ptr, r + 16, col, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES,
                    TOKENS16)


@triton.jit
def _store_tile(acc, ts, c_ptr, ws_ptr, r, col, M, N, stride_cm, stride_cn, WARPS: tl.constexpr,
                SPLIT_K: tl.constexpr, ROW_TILES: tl.constexpr, TOKENS16: tl.constexpr):
    """The accumulators of one tile of 16 weight rows (rows r and r + 8 of this lane), stored."""
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc
    _store_mma(acc0, ts, c_ptr, ws_ptr, r, col, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
    _store_mma(acc1, ts, c_ptr, ws_ptr, r, col + 1, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
    _store_mma(acc2, ts, c_ptr, ws_ptr, r + 8, col, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
    _store_mma(acc3, ts, c_ptr, ws_ptr, r + 8, col + 1, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
    if TOKENS16:
        _store_mma(acc4, ts, c_ptr, ws_ptr, r, col + 8, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
        _store_mma(acc5, ts, c_ptr, ws_ptr, r, col + 9, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
        _store_mma(acc6, ts, c_ptr, ws_ptr, r + 8, col + 8, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)
        _store_mma(acc7, ts, c_ptr, ws_ptr, r + 8, col + 9, M, N, stride_cm, stride_cn, WARPS, SPLIT_K, ROW_TILES)


@triton.jit
def _store_mma(v, ts, c_ptr, ws_ptr, row, col, M, N, stride_cm, stride_cn, WARPS: tl.constexpr,
               SPLIT_K: tl.constexpr, ROW_TILES: tl.constexpr):
    """One accumulator register of the MMA tiles, summed over the warps of each row tile's group and
    times the tensor scale: C[col, row] (C^T was computed), or this split's partial."""
    v = tl.reshape(tl.sum(tl.reshape(v, (ROW_TILES, WARPS // ROW_TILES, 32)), axis=1), (ROW_TILES * 32,)) * ts
    ok = (row < N) & (col < M)
    if SPLIT_K == 1:
        tl.store(c_ptr + col.to(tl.int64) * stride_cm + row * stride_cn, round_for_store(v, c_ptr), mask=ok)
    else:
        tl.store(ws_ptr + (tl.program_id(1) * M + col).to(tl.int64) * N + row, v, mask=ok)


# Compiled, M <= 16 runs _fp4_mma_gemv_kernel (MXFP4 and INT4 always, NVFP4 when K is a multiple of 32;
# INT4 takes MXFP4's setting, not yet swept): (num_warps, SPLIT_K) for M <= 8 and for 8 < M <= 16, the
# fastest of a sweep on an H200 at N = K = 8192 over 2..16 warps and SPLIT_K 1..4, taken while the
# activations were still re-paired by byte permutes (M <= 8: 20-23 us, 1.5-1.65x BF16; M = 16: 30 us
# with 4 warps, 34-47 with the others; a register cap of 64 changed M = 1 by 4%). Nsight Compute at
# M = 1 then: the integer/logic pipe 63% busy, DRAM 33%, 19 warps per SM -- the decode, not the bytes, set
# the time. Without the re-pairing (the stored benchmark): M <= 8 in 19.8-21.8 us. With the
# bit-placement decode (3.8 instructions per weight in the loop, from 4.8): M = 1 16.5-16.8 us, 4 warps
# within 1% for MXFP4 and 10% slower for NVFP4; loading the next segment's activations with its codes
# (72 registers) was 3-35% slower.
# (num_warps, SPLIT_K, ROW_TILES): a sweep on an H200 (2026-12-05, N = K = 8192, CUDA graphs, us per call)
# found no gain in two or four row tiles per program: M = 1, MXFP4: (8, 1, 1) 16.1, (16, 1, 2) 16.1,
# (8, 1, 2) 17.0, (16, 1, 4) 17.4; INT4 (16, 1, 2) 15.8 against (8, 1, 1) 17.3 (NVFP4 16.8 / 17.2);
# M = 16, MXFP4: (4, 1, 1) 27.9, (8, 1, 2) 28.8, (16, 1, 4) 29.7 (INT4 and NVFP4 alike). Reading the
# activations from L2 once per 32 rows does not shorten a loop that the decode, not L2, paces.
# Nsight Compute on an H100 (2026-12-05, MXFP4, N = K = 8192) then: at M = 16 the L1 was 90% busy (the
# sixteen activation rows are four times the bytes of the codes a warp reads), DRAM 32%, 15 warps per SM;
# at M = 1 the ALU 56%, DRAM 55%, the MMAs waiting on loads. Hence the fourth number, WARP_TILES: two
# tiles of 16 weight rows per warp, whose MMAs take the same activation registers, halve the activation
# loads per code. (num_warps, SPLIT_K, ROW_TILES, WARP_TILES) on the H100, us per call (CUDA graphs):
# M = 16, MXFP4: (4, 1, 1, 1) 28.8, (8, 1, 1, 2) 23.9, (4, 1, 1, 2) 28.0, (4, 2, 1, 2) 24.7, (8, 1, 2, 2)
# 29.1; INT4 28.0 -> 24.1, NVFP4 29.9 -> 25.2 (BF16 cuBLAS 47.8). M = 1 gains nothing from it (MXFP4
# (8, 1, 1, 1) 16.9, (8, 1, 1, 2) 18.7, (4, 2, 1, 2) 19.7).
MMA_GEMV_CONFIG = {fmt: ((8, 1, 1, 1), (8, 1, 1, 2)) for fmt in ("mxfp4", "nvfp4", "int4")}


def _gemv_mma(x, codes, scales, tensor_scale, out, fmt, config=None):
    """C = x @ W^T for M <= 16 through _fp4_mma_gemv_kernel: x zero-padded to Kp columns
    and read as bf16 pairs, the codes read as int32 words (copied only if their rows are not 4-byte
    aligned)."""
    M, N, Kp = x.shape[0], codes.shape[0], 2 * codes.shape[1]
    if x.shape[1] != Kp or not x.is_contiguous() or x.storage_offset() % 2:
        x = torch.nn.functional.pad(x, (0, Kp - x.shape[1])).contiguous()
    if codes.stride(1) != 1 or codes.stride(0) % 4 or codes.storage_offset() % 4:
        codes = codes.clone(memory_format=torch.contiguous_format)
    pairs, words = x.view(torch.int32), codes.view(torch.int32)
    if config is not None:
        warps, split, row_tiles, warp_tiles = config
    elif runtime.INTERPRET:  # K split in two when it is long enough, two groups of one warp each for M > 8,
        # and two tiles of weight rows per warp for M <= 8: CI runs every path
        warps, split, row_tiles, warp_tiles = 2, 2 if Kp > 256 else 1, 2 if M > 8 else 1, 1 if M > 8 else 2
    else:
        warps, split, row_tiles, warp_tiles = MMA_GEMV_CONFIG[fmt][M > 8]
    if warps % row_tiles:
        raise ValueError(f"{warps} warps do not split into {row_tiles} row tiles")
    if warp_tiles not in (1, 2):
        raise ValueError(f"a warp takes 1 or 2 tiles of 16 weight rows, not {warp_tiles}")
    ws = torch.empty((split, M, N) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    ts = tensor_scale if tensor_scale is not None else ws
    _fp4_mma_gemv_kernel[(triton.cdiv(N, 16 * row_tiles * warp_tiles), split)](
        pairs, words, scales, ts, out, ws, M, N, Kp, pairs.stride(0), words.stride(0), *scales.stride(),
        *out.stride(), NVFP4=fmt == "nvfp4", INT4=fmt == "int4", WARPS=warps, SPLIT_K=split, TOKENS16=M > 8,
        ROW_TILES=row_tiles, WARP_TILES=warp_tiles, PTX=not runtime.INTERPRET, num_warps=warps, num_stages=1)
    return _sum_splits(ws, out, M, N, split)


def _sum_splits(ws, out, M, N, split):
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(M * N, block),)](ws, out, M, N, *out.stride(), SPLIT_K=split, BLOCK=block)
    return out
