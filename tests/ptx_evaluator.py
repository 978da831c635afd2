"""A small PTX evaluator for the kernels' inline-asm blocks, run on the CPU.

The PTX blocks cannot run under the Triton interpreter, and the lent GPU is not always there,
so tests execute them here instruction by instruction (fp16 and fp32 rounding through NumPy)
and compare them with exact arithmetic. It knows only the instructions the blocks use.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch


def e4m3(code: int) -> float:
    """An e4m3 (fn) code's value, decoded from its bits: sign, 4-bit exponent (bias 7),
    3-bit mantissa, subnormals at exponent 0, NaN at S.1111.111 (no infinities)."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    if exponent == 0xF and mantissa == 7:
        return float("nan")
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def f16(bits: int) -> np.float16:
    return np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0]


def f16_bits(value) -> int:
    return int(np.array([value], dtype=np.float16).view(np.uint16)[0])


def f32(bits: int) -> np.float32:
    return np.array([bits & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]


def f32_bits(value) -> int:
    return int(np.array([value], dtype=np.float32).view(np.uint32)[0])


def bf16(bits: int) -> float:
    return float(f32((bits & 0xFFFF) << 16))


def bf16_bits(value: float) -> int:
    """bf16 bits of a float64, rounded to nearest even once (torch would round twice, through
    float32). Finite values within bf16's range only; subnormals keep bf16's 2^-133 step."""
    if value == 0:
        return 0x8000 if math.copysign(1.0, value) < 0 else 0
    _, exponent = math.frexp(value)  # |value| in [2^(exponent-1), 2^exponent)
    step = 2.0 ** (max(exponent - 1, -126) - 7)  # bf16 keeps 8 significant bits
    rounded = round(value / step) * step  # exact scaling; round() breaks ties to even
    return int(torch.tensor([rounded], dtype=torch.float32).to(torch.bfloat16).view(torch.int16)[0]) & 0xFFFF


def pairwise(a: int, b: int, c: int | None, op, bf: bool = False) -> int:
    """An f16x2 (bf: bf16x2) instruction: `op` on the low halves and on the high halves, each
    rounded once (float64 holds these products and sums exactly)."""
    out = 0
    for shift in (0, 16):
        if bf:
            x, y = bf16(a >> shift), bf16(b >> shift)
            z = None if c is None else bf16(c >> shift)
            out |= bf16_bits(op(x, y, z)) << shift
        else:
            x, y = float(f16(a >> shift)), float(f16(b >> shift))
            z = None if c is None else float(f16(c >> shift))
            out |= f16_bits(np.float16(op(x, y, z))) << shift
    return out


def run_ptx(asm: str, inputs: list[int], outputs: int) -> list[int]:
    """Execute one of the module's PTX blocks: `inputs` are the 32-bit patterns of $outputs..,
    returns the 32-bit patterns of $0..$outputs-1. Knows only the instructions they use."""
    regs = {f"${i + outputs}": value & 0xFFFFFFFF for i, value in enumerate(inputs)}

    def val(token: str) -> int:
        token = token.strip()
        if token.startswith("0f"):
            return int(token[2:], 16)
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", token):
            return int(token, 0) & 0xFFFFFFFF
        return regs[token]

    for line in asm.strip().strip("{}").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "mov.b32" and rest.rstrip().endswith("}"):  # pack two 16-bit values: d = {low, high}
            dst, _, pair = rest.partition(",")
            low, high = (val(name) & 0xFFFF for name in pair.strip(" {}").split(","))
            regs[dst.strip()] = low | (high << 16)
            continue
        if op == "mov.b32" and rest.startswith("{"):
            pair, _, src = rest.partition("},")
            low, high = (name.strip() for name in pair.strip("{ ").split(","))
            regs[low], regs[high] = val(src) & 0xFFFF, val(src) >> 16
            continue
        dst, *args = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in args]
        if op == "mov.b32":
            result = a[0]
        elif op == "lop3.b32":
            lut = a[3]
            result = 0
            for bit in range(32):
                index = (((a[0] >> bit) & 1) << 2) | (((a[1] >> bit) & 1) << 1) | ((a[2] >> bit) & 1)
                result |= ((lut >> index) & 1) << bit
        elif op == "prmt.b32":  # default mode: byte i of d = byte (selector nibble i & 7) of {b, a}
            pool = a[0] | (a[1] << 32)
            result = sum(((pool >> (8 * ((a[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "shr.u32":
            result = a[0] >> a[1]
        elif op == "shl.b32":
            result = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "and.b32":
            result = a[0] & a[1]
        elif op == "sub.f16x2":
            result = pairwise(a[0], a[1], None, lambda x, y, _: x - y)
        elif op == "mul.rn.f16x2":
            result = pairwise(a[0], a[1], None, lambda x, y, _: x * y)
        elif op == "fma.rn.f16x2":
            result = pairwise(a[0], a[1], a[2], lambda x, y, z: x * y + z)
        elif op == "sub.rn.bf16x2":
            result = pairwise(a[0], a[1], None, lambda x, y, _: x - y, bf=True)
        elif op == "fma.rn.bf16x2":
            result = pairwise(a[0], a[1], a[2], lambda x, y, z: x * y + z, bf=True)
        elif op == "cvt.rn.f16x2.e4m3x2":  # two e4m3 codes (low byte -> low half) -> fp16, exact
            result = f16_bits(e4m3(a[0] & 0xFF)) | (f16_bits(e4m3((a[0] >> 8) & 0xFF)) << 16)
        elif op == "cvt.f32.f16":
            result = f32_bits(np.float32(f16(a[0])))
        elif op == "add.f32":
            result = f32_bits(np.float32(f32(a[0])) + np.float32(f32(a[1])))
        elif op == "mul.f32":
            result = f32_bits(np.float32(f32(a[0])) * np.float32(f32(a[1])))
        elif op == "cvt.rn.f16x2.f32":  # d = {a (upper half), b (lower half)}
            result = (f16_bits(np.float16(f32(a[0]))) << 16) | f16_bits(np.float16(f32(a[1])))
        else:
            raise AssertionError(f"the evaluator does not know {op!r}")
        regs[dst] = result & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(outputs)]
