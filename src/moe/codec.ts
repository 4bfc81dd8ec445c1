// The byte-level codec under the wire frames (docs/wire-format.md): rows of float32
// activations to and from their bf16 / fp8 / f32 bytes, and CRC-32. Two implementations
// give the same bytes: the TypeScript one below, which is the reference (and the fallback
// where the native addon is not built), and the native addon's (shards/cpu/wire.cpp:
// SIMD conversion straight into the frame buffer with the CRC folded in, and a
// scatter-add on the way back). test/unit/wire-codec.test.ts checks they agree byte for
// byte. EM_WIRE_CODEC=ts forces the reference.
import { crc32 as zlibCrc32 } from "node:zlib";
import { loadAddon } from "../engine/native.ts";
import {
  bf16ArrayToFloat32,
  E4M3_MAX,
  e4m3Table256,
  float32ArrayToBf16,
  float32ToE4m3,
} from "../model/floats.ts";

export const FP8_GROUP = 128;

export type CodecDtype = "bf16" | "fp8" | "f32";
const DTYPE_CODE = { bf16: 1, fp8: 2, f32: 3 } as const satisfies Record<CodecDtype, number>;

/** Bytes of `rows` rows of width `dim` on the wire. */
export function rowBytes(dtype: CodecDtype, rows: number, dim: number): number {
  const n = rows * dim;
  if (dtype === "bf16") return 2 * n;
  if (dtype === "f32") return 4 * n;
  return n + 4 * rows * Math.ceil(dim / FP8_GROUP);
}

export interface WireCodec {
  readonly name: "native" | "ts";
  /** zlib's CRC-32 of `bytes`, continuing from `crc` (0 to start). */
  crc32(bytes: Uint8Array, crc?: number): number;
  /**
   * Writes rows of x [*, dim] as wire bytes of `dtype` into `out` (exactly rowBytes of
   * them): row r is x row rowIndex[r], or r without an index. Returns the CRC-32 of `out`
   * continued from `crc` (the CRC of the frame bytes before it); with `crc` null it
   * computes none and returns 0.
   */
  pack(
    x: Float32Array,
    dim: number,
    rowIndex: Int32Array | null,
    dtype: CodecDtype,
    out: Uint8Array,
    crc: number | null,
  ): number;
  /**
   * Reads `rows` rows of wire bytes into y [*, dim]: row r goes to y row outIndex[r] (or
   * r), replacing it, or added to it with `accumulate`.
   */
  unpack(
    bytes: Uint8Array,
    dtype: CodecDtype,
    rows: number,
    y: Float32Array,
    dim: number,
    outIndex: Int32Array | null,
    accumulate: boolean,
  ): void;
  /**
   * unpack, and the CRC-32 of `bytes` continued from `crc` (the CRC of the frame bytes
   * before them), computed in the same pass: a receiver checks a frame while converting it.
   */
  unpackCrc(
    bytes: Uint8Array,
    dtype: CodecDtype,
    rows: number,
    y: Float32Array,
    dim: number,
    outIndex: Int32Array | null,
    accumulate: boolean,
    crc: number,
  ): number;
}

/**
 * e4m3 code of |y| <= 448 (the caller scaled it), round to nearest even: the same result
 * as float32ToE4m3, with the common normal range done on the float32 bits inline.
 */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
function e4m3Fast(y: number): number {
  f32[0] = y;
  const b = u32[0]!;
  const sign = (b >>> 24) & 0x80;
  const exp = ((b >>> 23) & 0xff) - 120; // e4m3 exponent field (bias 7)
  if (exp < 1 || exp > 15) return float32ToE4m3(y); // subnormal, zero, or saturating: the careful path
  const m = b & 0x7fffff;
  let code = (exp << 3) + ((m + 0x7ffff + ((m >>> 20) & 1)) >>> 20); // mantissa carry bumps the exponent
  if (code > 0x7e) code = 0x7e; // saturate at 448 (0x7f is NaN)
  return sign | code;
}

/** 2^-126, the smallest normal float32. */
const F32_MIN_NORMAL = 2 ** -126;

/**
 * fp8 e4m3 codes and per-(token, 128-block) scales of activations [numTokens, hidden], in
 * float32 arithmetic (docs/wire-format.md): scale = f32(max|x| / 448) of the block (1 when
 * that is zero or subnormal: 1 / scale must not overflow), code = e4m3(f32(x * f32(1 / scale))).
 * Math.fround of a double quotient or product of two float32s is the float32 result.
 */
export function quantizeActivations(
  x: Float32Array,
  numTokens: number,
  hidden: number,
): { codes: Uint8Array; scales: Float32Array } {
  const groups = Math.ceil(hidden / FP8_GROUP);
  const codes = new Uint8Array(numTokens * hidden);
  const scales = new Float32Array(numTokens * groups);
  for (let t = 0; t < numTokens; t++) {
    for (let g = 0; g < groups; g++) {
      const start = t * hidden + g * FP8_GROUP;
      const end = t * hidden + Math.min(hidden, (g + 1) * FP8_GROUP);
      let amax = 0;
      for (let i = start; i < end; i++) {
        const a = Math.abs(x[i]!);
        if (a > amax) amax = a;
      }
      const s = Math.fround(amax / E4M3_MAX);
      const scale = s >= F32_MIN_NORMAL ? s : 1;
      scales[t * groups + g] = scale;
      const inv = Math.fround(1 / scale);
      for (let i = start; i < end; i++) codes[i] = e4m3Fast(Math.fround(x[i]! * inv));
    }
  }
  return { codes, scales };
}

const E4M3 = e4m3Table256();

function dequantizeActivations(
  codes: Uint8Array,
  scales: Float32Array,
  numTokens: number,
  hidden: number,
): Float32Array {
  const groups = Math.ceil(hidden / FP8_GROUP);
  const out = new Float32Array(numTokens * hidden);
  for (let t = 0; t < numTokens; t++) {
    for (let g = 0; g < groups; g++) {
      const scale = scales[t * groups + g]!;
      const end = t * hidden + Math.min(hidden, (g + 1) * FP8_GROUP);
      for (let i = t * hidden + g * FP8_GROUP; i < end; i++) out[i] = E4M3[codes[i]!]! * scale;
    }
  }
  return out;
}

/**
 * Copies rows rowIndex[0], rowIndex[1], ... of `table` (rows of `rowBytes` bytes) back to
 * back into `out` (exactly that many bytes) and returns the CRC-32 of `out` continued from
 * `crc`: how a sender puts activations it converted once (one row per token) into the
 * frames of several receivers. Rows whose size and place are whole 32-bit words go through
 * the codec's f32 pack (a copy of bits, with the CRC folded in).
 */
export function gatherRows(
  codec: WireCodec,
  table: Uint8Array,
  rowBytes: number,
  rowIndex: Int32Array,
  out: Uint8Array,
  crc: number,
): number {
  if (out.byteLength !== rowIndex.length * rowBytes)
    throw new RangeError(
      `gatherRows: ${out.byteLength} bytes for ${rowIndex.length} rows of ${rowBytes}`,
    );
  const tableRows = rowBytes > 0 ? Math.floor(table.byteLength / rowBytes) : 0;
  for (const r of rowIndex)
    if (r < 0 || r >= tableRows)
      throw new RangeError(`gatherRows: row ${r} outside the table's ${tableRows} rows`);
  if (rowBytes % 4 === 0 && table.byteOffset % 4 === 0 && rowBytes > 0) {
    const words = new Float32Array(table.buffer, table.byteOffset, (tableRows * rowBytes) / 4);
    return codec.pack(words, rowBytes / 4, rowIndex, "f32", out, crc);
  }
  for (let i = 0; i < rowIndex.length; i++) {
    const r = rowIndex[i]!;
    out.set(table.subarray(r * rowBytes, (r + 1) * rowBytes), i * rowBytes);
  }
  return codec.crc32(out, crc);
}

/** The bytes of any typed array, as a Uint8Array view. */
function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** An aligned copy of `n` elements at byte `offset` of `buf` (which may sit at any offset). */
function take<T extends Float32Array | Uint16Array>(
  buf: Uint8Array,
  offset: number,
  n: number,
  Ctor: { new (b: ArrayBuffer): T; BYTES_PER_ELEMENT: number },
): T {
  const bytes = new Uint8Array(n * Ctor.BYTES_PER_ELEMENT);
  bytes.set(buf.subarray(offset, offset + bytes.length));
  return new Ctor(bytes.buffer);
}

function check(dtype: CodecDtype, rows: number, dim: number, bytes: Uint8Array): void {
  const want = rowBytes(dtype, rows, dim);
  if (bytes.byteLength !== want)
    throw new RangeError(
      `wire codec: ${bytes.byteLength} bytes for ${rows} x ${dim} ${dtype}, need ${want}`,
    );
}

/** The reference codec: plain TypeScript over the conversions of src/model/floats.ts. */
export const tsCodec: WireCodec = {
  name: "ts",
  crc32: (bytes, crc = 0) => zlibCrc32(bytes, crc),
  pack(x, dim, rowIndex, dtype, out, crc) {
    const rows = rowIndex ? rowIndex.length : x.length / dim;
    check(dtype, rows, dim, out);
    let acts = x;
    if (rowIndex) {
      acts = new Float32Array(rows * dim);
      for (let r = 0; r < rows; r++)
        acts.set(x.subarray(rowIndex[r]! * dim, (rowIndex[r]! + 1) * dim), r * dim);
    }
    if (dtype === "bf16") out.set(bytesOf(float32ArrayToBf16(acts)));
    else if (dtype === "f32") out.set(bytesOf(acts));
    else {
      const { codes, scales } = quantizeActivations(acts, rows, dim);
      out.set(codes);
      out.set(bytesOf(scales), codes.length);
    }
    return crc === null ? 0 : zlibCrc32(out, crc);
  },
  unpack(bytes, dtype, rows, y, dim, outIndex, accumulate) {
    check(dtype, rows, dim, bytes);
    const n = rows * dim;
    let v: Float32Array;
    if (dtype === "bf16") v = bf16ArrayToFloat32(take(bytes, 0, n, Uint16Array));
    else if (dtype === "f32") v = take(bytes, 0, n, Float32Array);
    else {
      const scales = take(bytes, n, rows * Math.ceil(dim / FP8_GROUP), Float32Array);
      v = dequantizeActivations(bytes.subarray(0, n), scales, rows, dim);
    }
    for (let r = 0; r < rows; r++) {
      const dst = (outIndex ? outIndex[r]! : r) * dim;
      if (!accumulate) y.set(v.subarray(r * dim, (r + 1) * dim), dst);
      else for (let j = 0; j < dim; j++) y[dst + j]! += v[r * dim + j]!;
    }
  },
  unpackCrc(bytes, dtype, rows, y, dim, outIndex, accumulate, crc) {
    tsCodec.unpack(bytes, dtype, rows, y, dim, outIndex, accumulate);
    return zlibCrc32(bytes, crc);
  },
};

let native: WireCodec | null | undefined;

/** The addon's codec, or null where the addon is not built (or predates the codec). */
export function nativeCodec(): WireCodec | null {
  if (native !== undefined) return native;
  native = null;
  try {
    const addon = loadAddon();
    if (typeof addon.wirePack !== "function") return native;
    native = {
      name: "native",
      crc32: (bytes, crc = 0) => addon.crc32(bytes, crc),
      pack: (x, dim, rowIndex, dtype, out, crc) =>
        addon.wirePack(x, dim, rowIndex, DTYPE_CODE[dtype], out, crc),
      unpack(bytes, dtype, rows, y, dim, outIndex, accumulate) {
        addon.wireUnpack(bytes, DTYPE_CODE[dtype], rows, y, dim, outIndex, accumulate);
      },
      unpackCrc: (bytes, dtype, rows, y, dim, outIndex, accumulate, crc) =>
        addon.wireUnpack(bytes, DTYPE_CODE[dtype], rows, y, dim, outIndex, accumulate, crc),
    };
  } catch {
    // No addon here (EM_NATIVE_MISSING): the reference codec serves.
  }
  return native;
}

let chosen: WireCodec | undefined;

/** The codec frames use: native when the addon is built, unless EM_WIRE_CODEC=ts. */
export function wireCodec(): WireCodec {
  chosen ??= (process.env["EM_WIRE_CODEC"] !== "ts" && nativeCodec()) || tsCodec;
  return chosen;
}
