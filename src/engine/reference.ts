// The reference backend: every op written the obvious way in TypeScript (float64 sums),
// following DeepSeek-V3 inference/model.py. Slow; it exists to check the native kernels
// and the model code against each other. Shapes as in backend.ts.
import { bf16ToFloat32, e4m3Table256, f16ToFloat32 } from "../model/floats.ts";
import type { Backend, GateConfig, MlaArgs, MoeArgs, RopeConfig, Weight } from "./backend.ts";
import { decodeKvRows, kvRowBytes } from "./kv-format.ts";
import { ropeFrequencies } from "./rope.ts";
import { logprobRows, sampleRows } from "./sampling.ts";

const E4M3 = e4m3Table256();
const dequantized = new WeakMap<Weight, Float32Array>();

/** The weight as float32 [rows * cols] (cached per weight). */
export function weightToF32(w: Weight): Float32Array {
  const hit = dequantized.get(w);
  if (hit) return hit;
  let out: Float32Array;
  if (w.dtype === "f32") out = w.data as Float32Array;
  else if (w.dtype === "bf16") out = Float32Array.from(w.data as Uint16Array, bf16ToFloat32);
  else if (w.dtype === "f16") out = Float32Array.from(w.data as Uint16Array, f16ToFloat32);
  else {
    const codes = w.data as Uint8Array;
    const blocksPerRow = Math.ceil(w.cols / 128);
    out = new Float32Array(w.rows * w.cols);
    for (let r = 0; r < w.rows; r++) {
      for (let c = 0; c < w.cols; c++) {
        out[r * w.cols + c] =
          E4M3[codes[r * w.cols + c]!]! *
          w.scaleInv![Math.floor(r / 128) * blocksPerRow + Math.floor(c / 128)]!;
      }
    }
  }
  dequantized.set(w, out);
  return out;
}

function softmaxInPlace(v: Float64Array, n: number): void {
  let max = -Infinity;
  for (let i = 0; i < n; i++) max = Math.max(max, v[i]!);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    v[i] = Math.exp(v[i]! - max);
    sum += v[i]!;
  }
  for (let i = 0; i < n; i++) v[i]! /= sum;
}

/** Indices of the k largest values (ties: lower index first). */
function topk(values: ArrayLike<number>, k: number): number[] {
  return Array.from({ length: values.length }, (_, i) => i)
    .sort((a, b) => values[b]! - values[a]! || a - b)
    .slice(0, k);
}

/** The result in `out` when the caller gave one (Backend's contract), else as made. */
function into(out: Float32Array | undefined, y: Float32Array): Float32Array {
  if (!out) return y;
  out.set(y);
  return out;
}

export const referenceBackend: Backend = {
  name: "reference",

  matmul(x, m, w, out) {
    const W = weightToF32(w);
    const { rows: n, cols: k } = w;
    const y = new Float32Array(m * n);
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let s = 0;
        for (let p = 0; p < k; p++) s += x[i * k + p]! * W[j * k + p]!;
        y[i * n + j] = s;
      }
    }
    return into(out, y);
  },

  rmsnorm(x, m, weight, eps, out) {
    const g = weightToF32(weight);
    const d = x.length / m;
    const y = new Float32Array(x.length);
    for (let i = 0; i < m; i++) {
      let ss = 0;
      for (let j = 0; j < d; j++) ss += x[i * d + j]! ** 2;
      const inv = 1 / Math.sqrt(ss / d + eps);
      for (let j = 0; j < d; j++) y[i * d + j] = x[i * d + j]! * inv * g[j]!;
    }
    return into(out, y);
  },

  siluMul(gate, up, out) {
    return into(
      out,
      Float32Array.from(gate, (g, i) => (g / (1 + Math.exp(-g))) * up[i]!),
    );
  },

  rope(x, t, heads, stride, offset, positions, cfg: RopeConfig) {
    const freqs = ropeFrequencies(cfg);
    for (let i = 0; i < t; i++) {
      for (let h = 0; h < heads; h++) {
        const base = (i * heads + h) * stride + offset;
        for (let p = 0; p < cfg.ropeDim / 2; p++) {
          const angle = positions[i]! * freqs[p]!;
          const c = Math.cos(angle);
          const s = Math.sin(angle);
          const a = x[base + 2 * p]!;
          const b = x[base + 2 * p + 1]!;
          x[base + 2 * p] = a * c - b * s;
          x[base + 2 * p + 1] = a * s + b * c;
        }
      }
    }
  },

  gate(x, t, weight, bias, cfg: GateConfig) {
    const E = weight.rows;
    const logits = this.matmul(x, t, weight);
    const ids = new Int32Array(t * cfg.topK);
    const weights = new Float32Array(t * cfg.topK);
    const per = E / cfg.nGroup;
    for (let i = 0; i < t; i++) {
      const original = new Float64Array(E);
      for (let e = 0; e < E; e++) original[e] = logits[i * E + e]!;
      if (cfg.scoring === "softmax") softmaxInPlace(original, E);
      else for (let e = 0; e < E; e++) original[e] = 1 / (1 + Math.exp(-original[e]!));
      const scores = Float64Array.from(original, (s, e) => s + (bias ? bias[e]! : 0));
      if (cfg.method !== "greedy" && cfg.nGroup > 1) {
        const groupScore = Array.from({ length: cfg.nGroup }, (_, g) => {
          const members = Array.from(scores.subarray(g * per, (g + 1) * per)).sort((a, b) => b - a);
          return cfg.method === "noaux_tc" ? members[0]! + members[1]! : members[0]!;
        });
        const keep = new Set(topk(groupScore, cfg.topkGroup));
        for (let e = 0; e < E; e++) if (!keep.has(Math.floor(e / per))) scores[e] = -Infinity;
      }
      const chosen = topk(scores, cfg.topK);
      let sum = 0;
      for (const e of chosen) sum += original[e]!;
      chosen.forEach((e, k) => {
        ids[i * cfg.topK + k] = e;
        const w = cfg.normTopkProb ? original[e]! / sum : original[e]!;
        weights[i * cfg.topK + k] = w * cfg.routedScalingFactor;
      });
    }
    return { ids, weights };
  },

  moe(a: MoeArgs) {
    const y = new Float32Array(a.numOut * a.dim);
    for (let e = 0; e + 1 < a.offsets.length; e++) {
      const start = a.offsets[e]!;
      const rows = a.offsets[e + 1]! - start;
      if (rows === 0) continue;
      let x = a.x.subarray(start * a.dim, (start + rows) * a.dim);
      if (a.xIndex) {
        x = new Float32Array(rows * a.dim);
        for (let r = 0; r < rows; r++) {
          const src = a.xIndex[start + r]! * a.dim;
          x.set(a.x.subarray(src, src + a.dim), r * a.dim);
        }
      }
      const h = this.siluMul(this.matmul(x, rows, a.w1[e]!), this.matmul(x, rows, a.w3[e]!));
      const out = this.matmul(h, rows, a.w2[e]!);
      for (let r = 0; r < rows; r++) {
        const dst = a.outIndex[start + r]! * a.dim;
        const wgt = a.rowWeight[start + r]!;
        for (let j = 0; j < a.dim; j++) y[dst + j]! += wgt * out[r * a.dim + j]!;
      }
    }
    return into(a.out, y);
  },

  mla(a: MlaArgs) {
    const { heads, nopeDim: dn, ropeDim: dr, vDim: dv, kvLoraRank: C, pages } = a;
    const W = weightToF32(a.wkvB);
    const rowW = C + dr;
    const rowBytes = kvRowBytes(pages.dtype, C, dr);
    const out = new Float32Array(a.positions.length * heads * dv);
    for (let seq = 0; seq + 1 < a.qOffsets.length; seq++) {
      // The sequence's rows, decoded from its blocks.
      const t0 = a.qOffsets[seq]!;
      const t1 = a.qOffsets[seq + 1]!;
      let rows = 0;
      for (let t = t0; t < t1; t++) rows = Math.max(rows, a.positions[t]! + 1);
      const cache = new Float32Array(rows * rowW);
      for (let r = 0; r < rows; r += pages.blockSize) {
        const block = a.table[a.tableOffsets[seq]! + r / pages.blockSize]!;
        const n = Math.min(pages.blockSize, rows - r);
        cache.set(
          decodeKvRows(pages.dtype, C, dr, pages.pool, block * pages.blockSize * rowBytes, n),
          r * rowW,
        );
      }
      for (let t = t0; t < t1; t++) {
        const S = a.positions[t]! + 1;
        for (let h = 0; h < heads; h++) {
          const q = a.q.subarray((t * heads + h) * (dn + dr), (t * heads + h + 1) * (dn + dr));
          // q_lat = q_nope W_uk[h], W_uk[h] = rows h*(dn+dv) .. +dn of wkv_b.
          const qLat = new Float64Array(C);
          for (let i = 0; i < dn; i++) {
            const row = (h * (dn + dv) + i) * C;
            for (let c = 0; c < C; c++) qLat[c]! += q[i]! * W[row + c]!;
          }
          const scores = new Float64Array(S);
          for (let s = 0; s < S; s++) {
            let dot = 0;
            for (let c = 0; c < C; c++) dot += qLat[c]! * cache[s * rowW + c]!;
            for (let r = 0; r < dr; r++) dot += q[dn + r]! * cache[s * rowW + C + r]!;
            scores[s] = dot * a.softmaxScale;
          }
          softmaxInPlace(scores, S);
          const oLat = new Float64Array(C);
          for (let s = 0; s < S; s++)
            for (let c = 0; c < C; c++) oLat[c]! += scores[s]! * cache[s * rowW + c]!;
          for (let v = 0; v < dv; v++) {
            const row = (h * (dn + dv) + dn + v) * C;
            let o = 0;
            for (let c = 0; c < C; c++) o += W[row + c]! * oLat[c]!;
            out[(t * heads + h) * dv + v] = o;
          }
        }
      }
    }
    return into(a.out, out);
  },

  sample: sampleRows,
  logprobs: logprobRows,
};
