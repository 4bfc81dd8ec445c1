// Conversions between float32 and the narrow float formats checkpoints store: bfloat16,
// float16 (decode only) and fp8 e4m3 ("e4m3fn": no infinities, one NaN code per sign, max
// 448), plus the 128x128 block quantization DeepSeek-V3 uses for its fp8 weights.
// Narrow values travel as their raw bits (Uint16Array / Uint8Array), as safetensors stores
// them; all conversions round to nearest, ties to even.

/** Largest finite e4m3 magnitude: 2^8 * 1.75. */
export const E4M3_MAX = 448;

/** Side of the square weight blocks that share one fp8 scale (`weight_block_size`). */
export const FP8_BLOCK = 128;

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** The bfloat16 bits of `x` (rounded to nearest even; NaN stays a quiet NaN). */
export function float32ToBf16(x: number): number {
  f32[0] = x;
  return bitsToBf16(u32[0]!);
}

function bitsToBf16(b: number): number {
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  // Adding 0x7fff plus the lowest kept bit rounds ties to even; the carry may step the
  // exponent, which is the right result (up to infinity for values past bf16's range).
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

/** The float32 value of bfloat16 bits `h`. */
export function bf16ToFloat32(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0]!;
}

/** bfloat16 bits of every element of `src` (a new array of the same length). */
export function float32ArrayToBf16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  // The rounding of bitsToBf16, inlined: this loop runs over every activation on the wire.
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i]!;
    out[i] =
      (b & 0x7fffffff) > 0x7f800000
        ? ((b >>> 16) | 0x40) & 0xffff
        : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** float32 values of an array of bfloat16 bits. */
export function bf16ArrayToFloat32(src: Uint16Array): Float32Array {
  const out = new Float32Array(src.length);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < src.length; i++) bits[i] = src[i]! << 16;
  return out;
}

/** The float32 value of IEEE half-precision bits `h`. */
export function f16ToFloat32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 0x1f) return man === 0 ? sign * Infinity : Number.NaN;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

/** Rounds a non-negative number to the nearest integer, ties to even. */
function roundHalfEven(q: number): number {
  const f = Math.floor(q);
  const d = q - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * The e4m3 bits of `x` (taken as float32): round to nearest even, magnitudes past 448
 * (infinity included) saturate to +-448, NaN becomes 0x7f. Layout: sign, 4 exponent bits
 * (bias 7), 3 mantissa bits; exponent 0 holds the subnormals m * 2^-9.
 */
export function float32ToE4m3(x: number): number {
  f32[0] = x;
  const bits = u32[0]!;
  const sign = (bits >>> 24) & 0x80;
  const abs = bits & 0x7fffffff;
  if (abs > 0x7f800000) return 0x7f; // NaN
  if (abs >= 0x43e00000) return sign | 0x7e; // >= 448
  if (abs < 0x3c800000) {
    // Below 2^-6, the subnormal range: a multiple of 2^-9. m = 8 is the smallest normal,
    // whose code is 0x08.
    return sign | roundHalfEven(Math.abs(f32[0]!) * 512);
  }
  // Normal: rebias the exponent (127 -> 7) and keep the top 3 of 23 mantissa bits,
  // rounding the 20 dropped bits to nearest even; a carry steps the exponent, as it should.
  const kept = (abs >>> 20) & 0x7;
  const dropped = abs & 0xfffff;
  let code = ((((abs >>> 23) - 127 + 7) << 3) | kept) >>> 0;
  if (dropped > 0x80000 || (dropped === 0x80000 && (kept & 1) === 1)) code++;
  // 0x7f (exponent 15, mantissa 7) is NaN, so anything that rounds past 0x7e saturates.
  return sign | Math.min(code, 0x7e);
}

let e4m3Table: Float32Array | null = null;

/** The float32 values of all 256 e4m3 codes (NaN at 0x7f and 0xff). */
export function e4m3Table256(): Float32Array {
  if (e4m3Table === null) {
    const t = new Float32Array(256);
    for (let code = 0; code < 256; code++) {
      const sign = code & 0x80 ? -1 : 1;
      const exp = (code >>> 3) & 0xf;
      const man = code & 0x7;
      if (exp === 0xf && man === 0x7) t[code] = Number.NaN;
      else if (exp === 0) t[code] = sign * man * 2 ** -9;
      else t[code] = sign * (1 + man / 8) * 2 ** (exp - 7);
    }
    e4m3Table = t;
  }
  return e4m3Table;
}

/** The float32 value of e4m3 bits `code`. */
export function e4m3ToFloat32(code: number): number {
  return e4m3Table256()[code & 0xff]!;
}

/** An fp8 weight: e4m3 codes of a [rows, cols] matrix and its per-block dequant scales. */
export interface Fp8Weight {
  /** e4m3 codes, row-major [rows, cols]. */
  readonly codes: Uint8Array;
  /**
   * Dequant scales, row-major [ceil(rows/128), ceil(cols/128)]: the weight is
   * `e4m3ToFloat32(code) * scaleInv[block]` (the checkpoint's `weight_scale_inv`).
   */
  readonly scaleInv: Float32Array;
}

/**
 * Quantizes a row-major [rows, cols] float32 matrix to e4m3 with one scale per 128x128
 * block: scale = amax(block) / 448 (1 for an all-zero block), code = e4m3(w / scale).
 */
export function quantizeE4m3Blocks(w: Float32Array, rows: number, cols: number): Fp8Weight {
  if (w.length !== rows * cols) {
    throw new RangeError(`quantizeE4m3Blocks: ${w.length} values for a ${rows}x${cols} matrix`);
  }
  const blockRows = Math.ceil(rows / FP8_BLOCK);
  const blockCols = Math.ceil(cols / FP8_BLOCK);
  const scaleInv = new Float32Array(blockRows * blockCols);
  const codes = new Uint8Array(rows * cols);
  for (let br = 0; br < blockRows; br++) {
    const r0 = br * FP8_BLOCK;
    const r1 = Math.min(rows, r0 + FP8_BLOCK);
    for (let bc = 0; bc < blockCols; bc++) {
      const c0 = bc * FP8_BLOCK;
      const c1 = Math.min(cols, c0 + FP8_BLOCK);
      let amax = 0;
      for (let r = r0; r < r1; r++) {
        for (let c = c0; c < c1; c++) amax = Math.max(amax, Math.abs(w[r * cols + c]!));
      }
      const scale = amax > 0 ? Math.fround(amax / E4M3_MAX) : 1;
      scaleInv[br * blockCols + bc] = scale;
      for (let r = r0; r < r1; r++) {
        for (let c = c0; c < c1; c++) codes[r * cols + c] = float32ToE4m3(w[r * cols + c]! / scale);
      }
    }
  }
  return { codes, scaleInv };
}

/** Dequantizes an fp8 weight back to a row-major [rows, cols] float32 matrix. */
export function dequantizeE4m3Blocks(q: Fp8Weight, rows: number, cols: number): Float32Array {
  const table = e4m3Table256();
  const blockCols = Math.ceil(cols / FP8_BLOCK);
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const rowBlock = Math.floor(r / FP8_BLOCK) * blockCols;
    for (let c = 0; c < cols; c++) {
      const s = q.scaleInv[rowBlock + Math.floor(c / FP8_BLOCK)]!;
      out[r * cols + c] = table[q.codes[r * cols + c]!]! * s;
    }
  }
  return out;
}
