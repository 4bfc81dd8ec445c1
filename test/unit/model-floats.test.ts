import { describe, expect, it } from "vitest";
import {
  bf16ArrayToFloat32,
  bf16ToFloat32,
  dequantizeE4m3Blocks,
  e4m3ToFloat32,
  f16ToFloat32,
  float32ArrayToBf16,
  float32ToBf16,
  float32ToE4m3,
  quantizeE4m3Blocks,
} from "../../src/model/floats.ts";
import { Prng } from "../../src/model/prng.ts";

const hex = (n: number) => `0x${n.toString(16).padStart(2, "0")}`;

describe("float32 -> e4m3", () => {
  // [input, expected code, why]
  const cases: [number, number, string][] = [
    [0, 0x00, "zero"],
    [-0, 0x80, "negative zero keeps its sign"],
    [1, 0x38, "exponent 7 (bias), mantissa 0"],
    [-1, 0xb8, "sign bit"],
    [448, 0x7e, "largest finite"],
    [-448, 0xfe, "largest finite, negative"],
    [500, 0x7e, "saturates"],
    [464, 0x7e, "halfway past 448 saturates (0x7f is NaN)"],
    [Number.POSITIVE_INFINITY, 0x7e, "no infinities: saturates"],
    [Number.NEGATIVE_INFINITY, 0xfe, "saturates negative"],
    [Number.NaN, 0x7f, "NaN"],
    [2 ** -9, 0x01, "smallest subnormal 1/512"],
    [2 ** -10, 0x00, "half the smallest subnormal ties to even (0)"],
    [1.5 * 2 ** -9, 0x02, "tie between subnormals 1 and 2 goes to even 2"],
    [2.5 * 2 ** -9, 0x02, "tie between subnormals 2 and 3 goes to even 2"],
    [7 * 2 ** -9, 0x07, "largest subnormal"],
    [7.5 * 2 ** -9, 0x08, "tie rounds up into the smallest normal"],
    [2 ** -6, 0x08, "smallest normal"],
    [0.0625, 0x18, "2^-4: exponent field 3"],
    [0.3, 0x2a, "0.3 rounds to 0.3125"],
    [1.0625, 0x38, "tie between 1 and 1.125 goes to even mantissa 0"],
    [1.1875, 0x3a, "tie between 1.125 and 1.25 goes to even mantissa 2"],
    [1.9375, 0x40, "tie between 1.875 and 2 carries into the exponent"],
    [240, 0x77, "1.875 * 2^7"],
    [256, 0x78, "2^8"],
    [-0.0009, 0x80, "underflows to negative zero"],
    [-0.001, 0x81, "rounds to minus the smallest subnormal"],
  ];
  it.each(cases)("%s -> code %i (%s)", (x, code) => {
    expect(hex(float32ToE4m3(x))).toBe(hex(code));
  });
});

describe("e4m3 -> float32", () => {
  const cases: [number, number][] = [
    [0x00, 0],
    [0x01, 2 ** -9],
    [0x07, 7 * 2 ** -9],
    [0x08, 2 ** -6],
    [0x18, 0.0625],
    [0x38, 1],
    [0x3a, 1.25],
    [0x77, 240],
    [0x7e, 448],
    [0xb8, -1],
    [0xfe, -448],
  ];
  it.each(cases)("code %i -> %s", (code, value) => {
    expect(e4m3ToFloat32(code)).toBe(value);
  });

  it("0x7f and 0xff are NaN, 0x80 is -0", () => {
    expect(e4m3ToFloat32(0x7f)).toBeNaN();
    expect(e4m3ToFloat32(0xff)).toBeNaN();
    expect(Object.is(e4m3ToFloat32(0x80), -0)).toBe(true);
  });

  it("every finite code survives decode then encode", () => {
    for (let code = 0; code < 256; code++) {
      if ((code & 0x7f) === 0x7f) continue;
      expect(hex(float32ToE4m3(e4m3ToFloat32(code)))).toBe(hex(code));
    }
  });
});

describe("bfloat16 and float16", () => {
  const toBf16: [number, number][] = [
    [1, 0x3f80],
    [-2, 0xc000],
    [1 + 2 ** -8, 0x3f80], // tie, even mantissa stays
    [1 + 3 * 2 ** -8, 0x3f82], // tie, odd mantissa rounds up
    [1 + 2 ** -8 + 2 ** -20, 0x3f81], // just past the tie
    [Number.POSITIVE_INFINITY, 0x7f80],
    [3.4e38, 0x7f80], // rounds past bf16's largest finite
  ];
  it.each(toBf16)("%s -> bf16 %i", (x, bits) => {
    expect(float32ToBf16(x)).toBe(bits);
  });

  it("keeps NaN a NaN and round-trips arrays", () => {
    expect(bf16ToFloat32(float32ToBf16(Number.NaN))).toBeNaN();
    const src = new Float32Array([0, 1, -1.5, 3.140625, 65280, 2 ** -100]);
    expect([...bf16ArrayToFloat32(float32ArrayToBf16(src))]).toEqual([...src]);
  });

  const f16: [number, number][] = [
    [0x3c00, 1],
    [0xc000, -2],
    [0x0001, 2 ** -24],
    [0x7bff, 65504],
    [0x7c00, Number.POSITIVE_INFINITY],
  ];
  it.each(f16)("f16 %i -> %s", (bits, value) => {
    expect(f16ToFloat32(bits)).toBe(value);
  });
});

describe("128x128 block quantization", () => {
  it("scales each block so its largest magnitude is 448 and dequantizes closely", () => {
    const rows = 130;
    const cols = 200;
    const w = new Prng(7, "q").fillNormal(new Float32Array(rows * cols), 0.02);
    w[5] = 0.5; // one outlier in block (0, 0)
    const q = quantizeE4m3Blocks(w, rows, cols);
    expect(q.scaleInv.length).toBe(4); // [ceil(130/128), ceil(200/128)] = [2, 2]
    expect(q.scaleInv[0]).toBeCloseTo(0.5 / 448, 9);
    expect(q.codes[5]).toBe(0x7e);
    const back = dequantizeE4m3Blocks(q, rows, cols);
    let worst = 0;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const block = Math.floor(r / 128) * 2 + Math.floor(c / 128);
        const s = q.scaleInv[block]!;
        // e4m3 keeps 3 mantissa bits: error at most 1/16 relative, or half a subnormal step.
        const x = w[r * cols + c]!;
        const bound = Math.max(Math.abs(x) / 16, s * 2 ** -10) + 1e-12;
        worst = Math.max(worst, Math.abs(back[r * cols + c]! - x) / bound);
      }
    }
    expect(worst).toBeLessThanOrEqual(1);
  });

  it("gives an all-zero block scale 1", () => {
    const q = quantizeE4m3Blocks(new Float32Array(4), 2, 2);
    expect([...q.scaleInv]).toEqual([1]);
    expect([...q.codes]).toEqual([0, 0, 0, 0]);
  });
});
