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

/** One sequence's decode attention with its context split or not (shards/cpu/attention.cpp). */
export interface KvSplitRow {
  shape: string;
  context: number;
  /** Not split (EM_MLA_SPLIT_ROWS=2^30), the peer. */
  unsplitMs: Stats;
  /** Split (the default). */
  splitMs: Stats;
  /** max |split - unsplit| / max |unsplit|. */
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
  /** Absent in results from before 2026-12-01 18:30. */
  splits?: KvSplitRow[];
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
  const splits = decodeSplits(
    native,
    wkvB,
    rng,
    runs,
    o.quick ? [2048] : [1024, 4096, 16384],
    o.log,
  );
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
    splits,
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

/** mini-v3's attention (8 heads, kv_lora_rank 256, rope 32, nope/v 64): the split table's second shape. */
const MINI_SHAPE = {
  heads: 8,
  nopeDim: 64,
  ropeDim: 32,
  vDim: 64,
  kvLoraRank: 256,
  softmaxScale: 96 ** -0.5,
};
type MlaShape = typeof MINI_SHAPE;

/** A bf16 kv_b_proj for `shape`. */
function randomKvBOf(rng: Prng, shape: MlaShape): Weight {
  const rows = shape.heads * (shape.nopeDim + shape.vDim);
  const w = new Float32Array(rows * shape.kvLoraRank);
  rng.fillNormal(w, 0.05);
  return { dtype: "bf16", data: Uint16Array.from(w, float32ToBf16), rows, cols: shape.kvLoraRank };
}

/** One sequence's attention call over a bf16 paged cache of `context` rows, its last `queries` tokens as queries. */
function oneSequence(
  wkvB: Weight,
  rng: Prng,
  context: number,
  queries: number,
  shape: MlaShape = MLA_SHAPE,
) {
  const rowWidth = shape.kvLoraRank + shape.ropeDim;
  const rb = kvRowBytes("bf16", shape.kvLoraRank, shape.ropeDim);
  const blocks = Math.ceil(context / BLOCK);
  const pool = new Uint8Array(blocks * BLOCK * rb);
  const latent = new Float32Array(blocks * BLOCK * rowWidth);
  rng.fillNormal(latent, 1);
  encodeKvRows("bf16", shape.kvLoraRank, shape.ropeDim, latent, pool, 0);
  const q = new Float32Array(queries * shape.heads * (shape.nopeDim + shape.ropeDim));
  rng.fillNormal(q, 1);
  return {
    ...shape,
    wkvB,
    q,
    positions: Int32Array.from({ length: queries }, (_, t) => context - queries + t),
    qOffsets: Int32Array.from([0, queries]),
    pages: { dtype: "bf16" as const, pool, blockSize: BLOCK },
    table: Int32Array.from({ length: blocks }, (_, b) => b),
    tableOffsets: Int32Array.from([0, blocks]),
  };
}

/**
 * One call timed under two settings of an environment variable the addon reads per call
 * (`peer` first, then `subject`; undefined: unset), alternating: ms of each and
 * max |subject - peer| / max |peer|.
 */
function alternateEnv(
  name: string,
  values: { peer: string | undefined; subject: string | undefined },
  runs: number,
  call: () => Float32Array,
): { peerMs: Stats; subjectMs: Stats; relErr: number } {
  const was = process.env[name];
  const set = (v: string | undefined) => {
    if (v === undefined) delete process.env[name];
    else process.env[name] = v;
  };
  try {
    const sides = [values.peer, values.subject];
    set(sides[0]);
    const peer = call();
    set(sides[1]);
    const got = call();
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
        set(sides[f]);
        const t0 = performance.now();
        call();
        ms[f]!.push(performance.now() - t0);
      }
    return { peerMs: stats(ms[0]), subjectMs: stats(ms[1]), relErr: err / peerMax };
  } finally {
    set(was);
  }
}

/**
 * One sequence's prefill chunk (its last 512 tokens of `context`, bf16 rows) in the absorbed
 * and the multi-head form, alternating; the form is switched by EM_MLA_MHA_MIN_QUERIES.
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
  return contexts.map((context) => {
    const args = oneSequence(wkvB, rng, context, queries);
    const r = alternateEnv("EM_MLA_MHA_MIN_QUERIES", { peer: "0", subject: undefined }, runs, () =>
      native.mla(args),
    );
    const row = {
      context,
      queries,
      absorbedMs: r.peerMs,
      multiHeadMs: r.subjectMs,
      relErr: r.relErr,
    };
    log(
      `kvcache: prefill ${queries} of ${context}: absorbed ${medianRange(row.absorbedMs, 1)} ms, multi-head ${medianRange(row.multiHeadMs, 1)} ms, err ${row.relErr.toExponential(1)}`,
    );
    if (row.relErr > 1e-4) throw new Error("the two MLA forms differ by more than rounding");
    return row;
  });
}

/**
 * One sequence's decode token (bf16 rows) with its context split across the threads (the
 * default) and not split (EM_MLA_SPLIT_ROWS past the context: heads cut into groups that
 * each read the whole cache, the plan before splits), alternating.
 */
function decodeSplits(
  native: ReturnType<typeof nativeBackend>,
  wkvB: Weight,
  rng: Prng,
  runs: number,
  contexts: number[],
  log: (s: string) => void,
): KvSplitRow[] {
  const shapes = [
    { name: "V3 latent, 16 heads", shape: MLA_SHAPE as MlaShape, wkvB },
    { name: "mini-v3, 8 heads", shape: MINI_SHAPE, wkvB: randomKvBOf(rng, MINI_SHAPE) },
  ];
  return shapes.flatMap(({ name, shape, wkvB }) =>
    contexts.map((context) => {
      const args = oneSequence(wkvB, rng, context, 1, shape);
      const r = alternateEnv(
        "EM_MLA_SPLIT_ROWS",
        { peer: String(2 ** 30), subject: undefined },
        runs * 4,
        () => native.mla(args),
      );
      const row = {
        shape: name,
        context,
        unsplitMs: r.peerMs,
        splitMs: r.subjectMs,
        relErr: r.relErr,
      };
      log(
        `kvcache: one sequence's decode, ${name}, at ${context}: unsplit ${medianRange(row.unsplitMs, 2)} ms, split ${medianRange(row.splitMs, 2)} ms, err ${row.relErr.toExponential(1)}`,
      );
      if (row.relErr > 1e-4)
        throw new Error("split and unsplit attention differ by more than rounding");
      return row;
    }),
  );
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
${writes.join("\n")}${prefillTable(r)}${splitTable(r)}`;
}

/** A table after the others: a blank line, what it shows, its header rows and its rows. */
function laterTable(intro: string, header: string, rows: string[]): string {
  return `\n\n${intro}\n\n${header}\n${rows.join("\n")}`;
}

function prefillTable(r: KvCacheResults): string {
  if (!r.prefill?.length) return "";
  return laterTable(
    `A prefill chunk's attention (one sequence, its last ${r.prefill[0]!.queries} tokens as queries over the whole context, bf16 rows, the same shape otherwise) in MLA's two forms, alternating: the absorbed one (peer; decode's) and the multi-head one the engine takes for a sequence with many query tokens (cache rows up-projected through kv_b_proj once per call, \`shards/cpu/attention.cpp\`). Error: max |multi-head - absorbed| / max |absorbed|.`,
    "| context | query tokens | absorbed (peer) ms | multi-head ms | vs peer | error |\n|---:|---:|---:|---:|---:|---:|",
    r.prefill.map(
      (p) =>
        `| ${p.context} | ${p.queries} | ${medianRange(p.absorbedMs, 1)} | ${medianRange(p.multiHeadMs, 1)} | ${(p.absorbedMs.median / p.multiHeadMs.median).toFixed(2)}x | ${p.relErr.toExponential(1)} |`,
    ),
  );
}

function splitTable(r: KvCacheResults): string {
  if (!r.splits?.length) return "";
  return laterTable(
    "One sequence's decode attention (one query token over the whole context, bf16 rows; the shape above, and mini-v3's: 8 heads, kv_lora_rank 256, rope 32, nope/v 64), alternating: its context not split (peer: `EM_MLA_SPLIT_ROWS` past the context; with one sequence the heads are cut into groups so that every thread has work, and each group reads the whole cache) and split at fixed rows, each split an item and the splits' softmax states merged (the default, `shards/cpu/attention.cpp`). Error: max |split - unsplit| / max |unsplit|.",
    "| shape | context | unsplit (peer) ms | split ms | vs peer | error |\n|---|---:|---:|---:|---:|---:|",
    r.splits.map(
      (p) =>
        `| ${p.shape} | ${p.context} | ${medianRange(p.unsplitMs, 2)} | ${medianRange(p.splitMs, 2)} | ${(p.unsplitMs.median / p.splitMs.median).toFixed(2)}x | ${p.relErr.toExponential(1)} |`,
    ),
  );
}
