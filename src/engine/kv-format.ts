// How the latent KV cache stores a row (one token of one layer: the normalized latent, C
// values, then the rotated k_pe, dr values). The native kernels read the same layouts
// (shards/include/expertmesh/ops.h, em_kv_pages):
// - f32: C + dr float32 (exact; the default);
// - bf16: C + dr bfloat16, rounded to nearest even (half the bytes);
// - fp8: DeepSeek FlashMLA's layout: C e4m3 codes of the latent, one float32 scale per 128
//   latent values (amax / 448 of its 128), then k_pe in bf16 (656 bytes for V3's 512 + 64,
//   3.5x fewer than f32).

import {
  bf16ToFloat32,
  E4M3_MAX,
  e4m3Table256,
  FP8_BLOCK,
  float32ToBf16,
  float32ToE4m3,
} from "../model/floats.ts";
import { ExpertMeshError } from "../util/errors.ts";
import { loadAddon } from "./native.ts";

export type KvDtype = "f32" | "bf16" | "fp8";

/** The names users give (--kv-cache-dtype, spec.gateway.kvCacheDtype), vLLM's spelling. */
export const KV_CACHE_DTYPES = {
  float32: "f32",
  bfloat16: "bf16",
  fp8: "fp8",
  fp8_e4m3: "fp8",
} as const satisfies Record<string, KvDtype>;
export type KvCacheDtypeName = keyof typeof KV_CACHE_DTYPES;

/** The storage dtype a user's name stands for; EM_CLI_USAGE for an unknown one. */
export function parseKvCacheDtype(name: string): KvDtype {
  const d = (KV_CACHE_DTYPES as Record<string, KvDtype>)[name];
  if (d === undefined)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `unknown KV cache dtype '${name}' (one of ${Object.keys(KV_CACHE_DTYPES).join(", ")})`,
    );
  return d;
}

/** Bytes of one row of `dtype` (kvLoraRank C, rope dims dr). */
export function kvRowBytes(dtype: KvDtype, C: number, dr: number): number {
  switch (dtype) {
    case "f32":
      return 4 * (C + dr);
    case "bf16":
      return 2 * (C + dr);
    case "fp8":
      return C + 4 * Math.ceil(C / FP8_BLOCK) + 2 * dr;
  }
}

/** Writes float32 rows [n, C + dr] as `dtype` rows into `out` (bytes) from byte `at`. */
export type KvEncoder = (
  dtype: KvDtype,
  C: number,
  dr: number,
  rows: Float32Array,
  out: Uint8Array,
  at: number,
) => void;

/** The native encoder (the addon's kvEncode), when the addon is built; else null. */
let nativeEncode: KvEncoder | null | undefined;

/**
 * Writes float32 rows [n, C + dr] as `dtype` rows into `out` (bytes) from byte `at`; `out`
 * starts on a 4-byte boundary of its buffer. Natively when the addon is there (the same
 * bytes as encodeKvRowsPortable, several times faster), else in TypeScript.
 */
export const encodeKvRows: KvEncoder = (dtype, C, dr, rows, out, at) => {
  if (nativeEncode === undefined) {
    try {
      const addon = loadAddon();
      nativeEncode = (d, c, r, x, o, a) => addon.kvEncode(d, c, r, x, o, a);
    } catch {
      nativeEncode = null;
    }
  }
  (nativeEncode ?? encodeKvRowsPortable)(dtype, C, dr, rows, out, at);
};

/** The native raw writer (the addon's kvWrite), when the addon is built; else null. */
let nativeWrite: ((src: Uint8Array, out: Uint8Array, at: number) => void) | null | undefined;

/**
 * Writes rows already encoded (`src`, whole rows) into `out` from byte `at`: through the
 * addon when it is built, so that a device mirror of the pool (ADR 0010) sees them.
 */
export function writeKvBytes(src: Uint8Array, out: Uint8Array, at: number): void {
  if (nativeWrite === undefined) {
    try {
      const addon = loadAddon();
      // An addon built before kvWrite existed: no device mirror can be there either.
      nativeWrite =
        typeof addon.kvWrite === "function" ? (s, o, a) => addon.kvWrite(s, o, a) : null;
    } catch {
      nativeWrite = null;
    }
  }
  if (nativeWrite) nativeWrite(src, out, at);
  else out.set(src, at);
}

/** encodeKvRows in TypeScript: the reference the native encoder is tested against. */
export const encodeKvRowsPortable: KvEncoder = (dtype, C, dr, rows, out, at) => {
  const W = C + dr;
  const n = rows.length / W;
  if (dtype === "f32") {
    new Float32Array(out.buffer, out.byteOffset + at, n * W).set(rows);
    return;
  }
  if (dtype === "bf16") {
    const o = new Uint16Array(out.buffer, out.byteOffset + at, n * W);
    for (let i = 0; i < n * W; i++) o[i] = float32ToBf16(rows[i]!);
    return;
  }
  const rb = kvRowBytes(dtype, C, dr);
  const view = new DataView(out.buffer, out.byteOffset);
  const scales = Math.ceil(C / FP8_BLOCK);
  for (let r = 0; r < n; r++) {
    const src = r * W;
    const dst = at + r * rb;
    for (let b = 0; b < scales; b++) {
      const c0 = b * FP8_BLOCK;
      const c1 = Math.min(C, c0 + FP8_BLOCK);
      let amax = 0;
      for (let c = c0; c < c1; c++) amax = Math.max(amax, Math.abs(rows[src + c]!));
      const scale = amax > 0 && Number.isFinite(amax) ? Math.fround(amax / E4M3_MAX) : 1;
      view.setFloat32(dst + C + 4 * b, scale, true);
      // Scaled into a float32 scratch, then rounded from the bits (float32ToE4m3's rule
      // inlined: it is the hot loop of writing a prefill's rows).
      const inv = 1 / scale;
      for (let c = c0; c < c1; c++) scaled[c - c0] = rows[src + c]! * inv;
      for (let c = c0; c < c1; c++) {
        const bits = scaledBits[c - c0]!;
        const abs = bits & 0x7fffffff;
        let code: number;
        if (abs >= 0x3c800000 && abs < 0x43e00000) {
          const kept = (abs >>> 20) & 0x7;
          const dropped = abs & 0xfffff;
          code = (((abs >>> 23) - 120) << 3) | kept;
          if (dropped > 0x80000 || (dropped === 0x80000 && (kept & 1) === 1)) code++;
          code = ((bits >>> 24) & 0x80) | Math.min(code, 0x7e);
        } else code = float32ToE4m3(scaled[c - c0]!); // subnormal, saturated, NaN
        out[dst + c] = code;
      }
    }
    const pe = dst + C + 4 * scales;
    for (let i = 0; i < dr; i++)
      view.setUint16(pe + 2 * i, float32ToBf16(rows[src + C + i]!), true);
  }
};

const scaled = new Float32Array(FP8_BLOCK);
const scaledBits = new Uint32Array(scaled.buffer);

/** Reads n `dtype` rows from `bytes` at byte `at` as float32 rows [n, C + dr]. */
export function decodeKvRows(
  dtype: KvDtype,
  C: number,
  dr: number,
  bytes: Uint8Array,
  at: number,
  n: number,
): Float32Array {
  const W = C + dr;
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  const out = new Float32Array(n * W);
  if (dtype === "f32") {
    for (let i = 0; i < n * W; i++) out[i] = view.getFloat32(at + 4 * i, true);
    return out;
  }
  if (dtype === "bf16") {
    for (let i = 0; i < n * W; i++) out[i] = bf16ToFloat32(view.getUint16(at + 2 * i, true));
    return out;
  }
  const rb = kvRowBytes(dtype, C, dr);
  const table = e4m3Table256();
  const scales = Math.ceil(C / FP8_BLOCK);
  for (let r = 0; r < n; r++) {
    const src = at + r * rb;
    for (let c = 0; c < C; c++) {
      const scale = view.getFloat32(src + C + 4 * Math.floor(c / FP8_BLOCK), true);
      out[r * W + c] = Math.fround(table[bytes[src + c]!]! * scale);
    }
    const pe = src + C + 4 * scales;
    for (let i = 0; i < dr; i++)
      out[r * W + C + i] = bf16ToFloat32(view.getUint16(pe + 2 * i, true));
  }
  return out;
}
