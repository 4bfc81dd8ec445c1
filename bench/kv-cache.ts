// The kvcache suite: one layer's MLA decode attention over the gateway's block cache, a
// batch of 8 sequences at 512-8192 tokens of context, V3's latent dims (kv_lora_rank 512,
// rope 64, nope/v heads 128) with 16 heads. The peer is what the engine did before paged
// attention, measured in the same run: gather each sequence's rows out of its blocks into
// a fresh contiguous f32 array, then one native call per sequence. Ours: one native call
// for the batch reading the blocks in place (em_kv_pages), with f32, bf16 and fp8
// (FlashMLA's layout) rows; and what writing a step's rows costs per dtype (the native
// encoder against the TypeScript one). Every side's output is checked against the peer's.
import type { KvPages, Weight } from "../src/engine/backend.ts";
import {
  encodeKvRows,
  encodeKvRowsPortable,
  type KvDtype,
  kvRowBytes,
} from "../src/engine/kv-format.ts";
import { loadAddon, nativeBackend } from "../src/engine/native.ts";
import { float32ToBf16 } from "../src/model/floats.ts";
import { Prng } from "../src/model/prng.ts";
import { buildLimits, Limits, medianRange, type Stats, stats } from "./lib.ts";

const H = 16;
const DN = 128;
const DR = 64;
const DV = 128;
const C = 512;
const W = C + DR;
const BATCH = 8;
/** The attention measured: DeepSeek-V3's latent, 16 heads (also bench/attn-quick.ts's). */
export const MLA_SHAPE = {
  heads: H,
  nopeDim: DN,
  ropeDim: DR,
  vDim: DV,
  kvLoraRank: C,
  softmaxScale: (DN + DR) ** -0.5,
} as const;
export const KV_BATCH = BATCH;

/** A random bf16 kv_b_proj of MLA_SHAPE. */
export function randomKvB(rng: Prng): Weight {
  const w = new Float32Array(H * (DN + DV) * C);
  rng.fillNormal(w, 0.05);
  return { dtype: "bf16", data: Uint16Array.from(w, float32ToBf16), rows: H * (DN + DV), cols: C };
}
const BLOCK = Number(process.env["EM_BENCH_KV_BLOCK"] ?? 16);
const CONTEXTS = [512, 2048, 8192];
const QUICK_CONTEXTS = [2048];
const SIDES = ["copy (peer)", "paged f32", "paged bf16", "paged fp8"] as const;
type Side = (typeof SIDES)[number];
const DTYPE_OF: Record<Side, KvDtype> = {
  "copy (peer)": "f32",
  "paged f32": "f32",
  "paged bf16": "bf16",
  "paged fp8": "fp8",
};

export interface KvCacheRow {
  context: number;
  side: Side;
  /** Milliseconds per layer and step (the batch's attention). */
  ms: Stats;
  /** max |out - peer| / max |peer|. */
  relErr: number;
}

export interface KvWriteRow {
  dtype: KvDtype;
  /** Microseconds to encode one token's row of one layer (a 2048-token prefill chunk). */
  usPerRow: Stats;
  /** The same in TypeScript (encodeKvRowsPortable), the peer. */
  portableUsPerRow: Stats;
}

/** A prefill chunk's attention in each MLA form (shards/cpu/attention.cpp). */
export interface KvPrefillRow {
  context: number;
  /** Query tokens: the context's last ones. */
  queries: number;
  /** The absorbed form (EM_MLA_MHA_MIN_QUERIES=0), the peer. */
  absorbedMs: Stats;
  /** The multi-head form (the default for so many queries). */
  multiHeadMs: Stats;
  /** max |multi-head - absorbed| / max |absorbed|. */
  relErr: number;
}

export interface KvCacheResults {
  threads: number;
  runs: number;
  batch: number;
  blockSize: number;
  rows: KvCacheRow[];
  writes: KvWriteRow[];
  /** Absent in results from before 2026-12-01 16:40. */
  prefill?: KvPrefillRow[];
  bytesPerRow: Record<KvDtype, number>;
  /** Limits measured in the same run: read bandwidth (GB/s) and FMA peak (GFLOP/s). */
  readGbs: Stats;
  fmaGflops: Stats;
  /** FLOPs of one side's call (the batch's attention of one layer), per context. */
  flops: Record<number, number>;
}

export async function runKvCache(o: {
  threads: number;
  runs: number;
  quick: boolean;
  log: (s: string) => void;
}): Promise<KvCacheResults> {
  const addon = loadAddon();
  addon.configure({ threads: o.threads });
  const native = nativeBackend();
  const rng = new Prng(7);
  const runs = o.quick ? 2 : o.runs;
  const wkvB = randomKvB(rng);
  const rows: KvCacheRow[] = [];
  const limits = await Limits.start(buildLimits(o.log), o.threads, 256);
  const readGbs: number[] = [];
  const fmaGflops: number[] = [];
  const flops: Record<number, number> = {};
  for (const context of o.quick ? QUICK_CONTEXTS : CONTEXTS) {
    // The batch's rows in the blocks of one pool per dtype, in shuffled block order.
    const blocksPer = Math.ceil(context / BLOCK);
    const numBlocks = BATCH * blocksPer;
    const order = Array.from({ length: numBlocks }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rng.uniform() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const table = Int32Array.from(order);
    const tableOffsets = Int32Array.from({ length: BATCH + 1 }, (_, s) => s * blocksPer);
    const latent = new Float32Array(BLOCK * W);
    const pools = new Map<KvDtype, KvPages>();
    for (const d of ["f32", "bf16", "fp8"] as const) {
      const rb = kvRowBytes(d, C, DR);
      pools.set(d, { dtype: d, pool: new Uint8Array(numBlocks * BLOCK * rb), blockSize: BLOCK });
    }
    for (let b = 0; b < numBlocks; b++) {
      rng.fillNormal(latent, 1);
      for (const [d, p] of pools)
        encodeKvRows(d, C, DR, latent, p.pool, b * BLOCK * kvRowBytes(d, C, DR));
    }
    const q = new Float32Array(BATCH * H * (DN + DR));
    rng.fillNormal(q, 1);
    const positions = Int32Array.from({ length: BATCH }, () => context - 1);
    const qOffsets = Int32Array.from({ length: BATCH + 1 }, (_, i) => i);
    const common = { ...MLA_SHAPE, wkvB };
    const f32Pool = pools.get("f32")!.pool;
    const run = (side: Side): Float32Array => {
      if (side !== "copy (peer)")
        return native.mla({
          ...common,
          q,
          positions,
          qOffsets,
          pages: pools.get(DTYPE_OF[side])!,
          table,
          tableOffsets,
        });
      // Before: the view's rows() copy per sequence, then a call per sequence.
      const out = new Float32Array(BATCH * H * DV);
      for (let s = 0; s < BATCH; s++) {
        const rowsOf = new Float32Array(f32Pool.buffer);
        const cache = new Float32Array(context * W);
        for (let p = 0; p < context; p += BLOCK) {
          const at = table[s * blocksPer + p / BLOCK]! * BLOCK * W;
          cache.set(rowsOf.subarray(at, at + Math.min(BLOCK, context - p) * W), p * W);
        }
        const o1 = addon.mlaAttention({
          q: q.subarray(s * H * (DN + DR), (s + 1) * H * (DN + DR)),
          positions: positions.subarray(s, s + 1),
          caches: cache,
          numHeads: H,
          qkNopeHeadDim: DN,
          qkRopeHeadDim: DR,
          vHeadDim: DV,
          kvLoraRank: C,
          wkvB: { dtype: "bf16", shape: [wkvB.rows, wkvB.cols], data: wkvB.data },
          softmaxScale: common.softmaxScale,
        });
        out.set(o1, s * H * DV);
      }
      return out;
    };
    const peer = run("copy (peer)");
    let peerMax = 0;
    for (const v of peer) peerMax = Math.max(peerMax, Math.abs(v));
    const times = new Map<Side, number[]>(SIDES.map((s) => [s, []]));
    const errs = new Map<Side, number>();
    for (const s of SIDES) run(s); // warm-up
    const reps = Math.max(3, Math.round(20_000 / context));
    // q_nope W_UK, scores over [latent | pe], P latent, o W_UV: per sequence and head.
    flops[context] = 2 * BATCH * H * (DN * C + context * W + context * C + C * DV);
    for (let r = 0; r < runs; r++) {
      readGbs.push((await limits.membw()).read_gbs);
      fmaGflops.push((await limits.fma()).gflops);
      // Sides in turn, the order rotated each run.
      for (let k = 0; k < SIDES.length; k++) {
        const side = SIDES[(k + r) % SIDES.length]!;
        let out = peer;
        const t0 = performance.now();
        for (let i = 0; i < reps; i++) out = run(side);
        times.get(side)!.push((performance.now() - t0) / reps);
        let e = 0;
        for (let i = 0; i < out.length; i++) e = Math.max(e, Math.abs(out[i]! - peer[i]!));
        errs.set(side, e / peerMax);
      }
    }
    for (const side of SIDES) {
      const row = { context, side, ms: stats(times.get(side)!), relErr: errs.get(side)! };
      rows.push(row);
      o.log(
        `kvcache: context ${context} ${side}: ${medianRange(row.ms, 2)} ms, err ${row.relErr.toExponential(1)}`,
      );
    }
    if (errs.get("paged f32")! > 1e-5)
      throw new Error("paged f32 attention differs from the peer's");
  }
  await limits.close();
  const prefill = prefillForms(native, wkvB, rng, runs, o.quick ? [2048] : [1024, 4096], o.log);
  // Writing: a 2048-token chunk's rows of one layer.
  const chunk = new Float32Array(2048 * W);
  rng.fillNormal(chunk, 1);
  const writes: KvWriteRow[] = [];
  for (const d of ["f32", "bf16", "fp8"] as const) {
    const out = new Uint8Array(2048 * kvRowBytes(d, C, DR));
    const sides = [encodeKvRows, encodeKvRowsPortable];
    for (const encode of sides) for (let i = 0; i < 3; i++) encode(d, C, DR, chunk, out, 0); // warm-up (JIT)
    const us: number[][] = [[], []];
    for (let r = 0; r < runs; r++) {
      for (let k = 0; k < 2; k++) {
        const side = (k + r) % 2;
        const t0 = performance.now();
        sides[side]!(d, C, DR, chunk, out, 0);
        us[side]!.push(((performance.now() - t0) * 1000) / 2048);
      }
    }
    writes.push({ dtype: d, usPerRow: stats(us[0]!), portableUsPerRow: stats(us[1]!) });
    o.log(
      `kvcache: write ${d}: ${medianRange(stats(us[0]!), 2)} us per row (TypeScript ${medianRange(stats(us[1]!), 2)})`,
    );
  }
  return {
    threads: o.threads,
    runs,
    batch: BATCH,
    blockSize: BLOCK,
    rows,
    writes,
    prefill,
    readGbs: stats(readGbs),
    fmaGflops: stats(fmaGflops),
    flops,
    bytesPerRow: {
      f32: kvRowBytes("f32", C, DR),
      bf16: kvRowBytes("bf16", C, DR),
      fp8: kvRowBytes("fp8", C, DR),
    },
  };
}

/**
 * One sequence's prefill chunk (its last 512 tokens of `context`, bf16 rows) in the absorbed
 * and the multi-head form, alternating; the form is switched by EM_MLA_MHA_MIN_QUERIES, which
 * the addon reads per call.
 */
function prefillForms(
  native: ReturnType<typeof nativeBackend>,
  wkvB: Weight,
  rng: Prng,
  runs: number,
  contexts: number[],
  log: (s: string) => void,
): KvPrefillRow[] {
  const queries = 512;
  const rb = kvRowBytes("bf16", C, DR);
  const out: KvPrefillRow[] = [];
  const was = process.env["EM_MLA_MHA_MIN_QUERIES"];
  try {
    for (const context of contexts) {
      const blocks = Math.ceil(context / BLOCK);
      const pool = new Uint8Array(blocks * BLOCK * rb);
      const latent = new Float32Array(blocks * BLOCK * W);
      rng.fillNormal(latent, 1);
      encodeKvRows("bf16", C, DR, latent, pool, 0);
      const q = new Float32Array(queries * H * (DN + DR));
      rng.fillNormal(q, 1);
      const args = {
        ...MLA_SHAPE,
        wkvB,
        q,
        positions: Int32Array.from({ length: queries }, (_, t) => context - queries + t),
        qOffsets: Int32Array.from([0, queries]),
        pages: { dtype: "bf16" as const, pool, blockSize: BLOCK },
        table: Int32Array.from({ length: blocks }, (_, b) => b),
        tableOffsets: Int32Array.from([0, blocks]),
      };
      const forms = ["absorbed", "multi-head"] as const;
      const call = (form: (typeof forms)[number]) => {
        if (form === "absorbed") process.env["EM_MLA_MHA_MIN_QUERIES"] = "0";
        else delete process.env["EM_MLA_MHA_MIN_QUERIES"];
        return native.mla(args);
      };
      const peer = call("absorbed");
      const got = call("multi-head");
      let peerMax = 0;
      let err = 0;
      for (let i = 0; i < peer.length; i++) {
        peerMax = Math.max(peerMax, Math.abs(peer[i]!));
        err = Math.max(err, Math.abs(got[i]! - peer[i]!));
      }
      const ms: [number[], number[]] = [[], []];
      for (let r = 0; r < runs; r++)
        for (let k = 0; k < 2; k++) {
          const f = (k + r) % 2;
          const t0 = performance.now();
          call(forms[f]!);
          ms[f]!.push(performance.now() - t0);
        }
      const row = {
        context,
        queries,
        absorbedMs: stats(ms[0]),
        multiHeadMs: stats(ms[1]),
        relErr: err / peerMax,
      };
      out.push(row);
      log(
        `kvcache: prefill ${queries} of ${context}: absorbed ${medianRange(row.absorbedMs, 1)} ms, multi-head ${medianRange(row.multiHeadMs, 1)} ms, err ${row.relErr.toExponential(1)}`,
      );
      if (row.relErr > 1e-4) throw new Error("the two MLA forms differ by more than rounding");
    }
  } finally {
    if (was === undefined) delete process.env["EM_MLA_MHA_MIN_QUERIES"];
    else process.env["EM_MLA_MHA_MIN_QUERIES"] = was;
  }
  return out;
}

export function kvCacheTables(
  r: KvCacheResults & { date: string; commit: string; machine: { cpu: string; cores: number } },
  source: string,
): string {
  const lines = r.rows.map((row) => {
    const peer = r.rows.find((x) => x.context === row.context && x.side === "copy (peer)")!;
    const bytes = r.bytesPerRow[DTYPE_OF[row.side]];
    const gbps = (r.batch * row.context * bytes) / (row.ms.median / 1000) / 1e9;
    const gflops = r.flops[row.context]! / (row.ms.median / 1000) / 1e9;
    return `| ${row.context} | ${row.side} | ${medianRange(row.ms, 2)} | ${row.side === "copy (peer)" ? "1" : (peer.ms.median / row.ms.median).toFixed(2)}x | ${gbps.toFixed(1)} (${((100 * gbps) / r.readGbs.median).toFixed(0)} %) | ${gflops.toFixed(1)} (${((100 * gflops) / r.fmaGflops.median).toFixed(0)} %) | ${row.side === "copy (peer)" ? "-" : row.relErr.toExponential(1)} |`;
  });
  const writes = r.writes.map(
    (w) =>
      `| ${w.dtype} | ${r.bytesPerRow[w.dtype]} | ${(r.bytesPerRow.f32 / r.bytesPerRow[w.dtype]).toFixed(2)}x | ${medianRange(w.usPerRow, 2)} | ${medianRange(w.portableUsPerRow, 2)} | ${(w.portableUsPerRow.median / w.usPerRow.median).toFixed(1)}x |`,
  );
  return `Run ${r.date} at ${r.commit.slice(0, 7)} on ${r.machine.cpu} (${r.machine.cores} CPUs), ${r.threads} threads, ${r.runs} runs with the sides in rotating order; from \`${source}\`. One layer's MLA decode attention for a batch of ${r.batch} sequences, each at the context given, V3's latent (kv_lora_rank 512 + rope 64, nope/v 128) with 16 heads, bf16 kv_b_proj, blocks of ${r.blockSize} tokens in shuffled order. Peer: the engine before paged attention (each sequence's rows copied out of its blocks into a new f32 array, then a call per sequence). GB/s: cache bytes read per second (batch x context x row bytes / time), and its share of the read bandwidth measured in the same run (${r.readGbs.median.toFixed(1)} GB/s); GFLOP/s: the attention's arithmetic per second, and its share of the FMA peak measured in the same run (${r.fmaGflops.median.toFixed(1)} GFLOP/s). Error: max |out - peer| / max |peer| (bf16 and fp8 rows are rounded, the peer's are f32).

| context | side | ms per layer | vs peer | cache GB/s (of read bw) | GFLOP/s (of FMA peak) | error |
|---:|---|---:|---:|---:|---:|---:|
${lines.join("\n")}

Row sizes and what writing them costs (a 2048-token chunk of one layer): the native encoder the caches use (the addon's kvEncode), against the TypeScript one (encodeKvRowsPortable, the same bytes) as peer, alternating:

| dtype | bytes per row | tokens per byte vs f32 | µs per row | TypeScript (peer) µs | vs peer |
|---|---:|---:|---:|---:|---:|
${writes.join("\n")}${prefillTable(r)}`;
}

function prefillTable(r: KvCacheResults): string {
  if (!r.prefill?.length) return "";
  const lines = r.prefill.map(
    (p) =>
      `| ${p.context} | ${p.queries} | ${medianRange(p.absorbedMs, 1)} | ${medianRange(p.multiHeadMs, 1)} | ${(p.absorbedMs.median / p.multiHeadMs.median).toFixed(2)}x | ${p.relErr.toExponential(1)} |`,
  );
  return `

A prefill chunk's attention (one sequence, its last ${r.prefill[0]!.queries} tokens as queries over the whole context, bf16 rows, the same shape otherwise) in MLA's two forms, alternating: the absorbed one (peer; decode's) and the multi-head one the engine takes for a sequence with many query tokens (cache rows up-projected through kv_b_proj once per call, \`shards/cpu/attention.cpp\`). Error: max |multi-head - absorbed| / max |absorbed|.

| context | query tokens | absorbed (peer) ms | multi-head ms | vs peer | error |
|---:|---:|---:|---:|---:|---:|
${lines.join("\n")}`;
}
