// Quick check of one MLA attention call (paged, the kvcache suite's shape): ms per call for a
// row dtype and context, for A/B runs with EM_NATIVE_ADDON (or EM_MLA_MHA_MIN_QUERIES). Not a
// suite: bench/kv-cache.ts is.
// usage: node bench/attn-quick.ts DTYPE CONTEXT SECONDS [QUERIES]
// QUERIES (default 1): 1 is decode, the suite's batch of sequences each with its last token;
// more is a prefill chunk, one sequence whose last QUERIES tokens are the queries.
import { encodeKvRows, type KvDtype, kvRowBytes } from "../src/engine/kv-format.ts";
import { nativeBackend } from "../src/engine/native.ts";
import { Prng } from "../src/model/prng.ts";
import { KV_BATCH, MLA_SHAPE, randomKvB } from "./kv-cache.ts";

const [dtype = "f32", ctxArg = "8192", secsArg = "5", queriesArg = "1"] = process.argv.slice(2);
const d = dtype as KvDtype;
const context = Number(ctxArg);
const queries = Number(queriesArg);
const seqs = queries > 1 ? 1 : KV_BATCH;
const T = queries > 1 ? queries : KV_BATCH;
const { heads, nopeDim, ropeDim, kvLoraRank } = MLA_SHAPE;
const BLOCK = 16;
const rng = new Prng(1);
const native = nativeBackend();
const blocksPer = Math.ceil(context / BLOCK);
const numBlocks = seqs * blocksPer;
const order = Array.from({ length: numBlocks }, (_, i) => i).sort(() => rng.uniform() - 0.5);
const rb = kvRowBytes(d, kvLoraRank, ropeDim);
const pool = new Uint8Array(numBlocks * BLOCK * rb);
const latent = new Float32Array(BLOCK * (kvLoraRank + ropeDim));
for (let b = 0; b < numBlocks; b++) {
  rng.fillNormal(latent, 1);
  encodeKvRows(d, kvLoraRank, ropeDim, latent, pool, b * BLOCK * rb);
}
const q = new Float32Array(T * heads * (nopeDim + ropeDim));
rng.fillNormal(q, 1);
const args = {
  ...MLA_SHAPE,
  wkvB: randomKvB(rng),
  q,
  positions: Int32Array.from({ length: T }, (_, t) =>
    queries > 1 ? context - T + t : context - 1,
  ),
  qOffsets: Int32Array.from({ length: seqs + 1 }, (_, i) => (queries > 1 ? i * T : i)),
  pages: { dtype: d, pool, blockSize: BLOCK },
  table: Int32Array.from(order),
  tableOffsets: Int32Array.from({ length: seqs + 1 }, (_, s) => s * blocksPer),
};
for (let i = 0; i < 3; i++) native.mla(args);
const ms: number[] = [];
const end = performance.now() + Number(secsArg) * 1000;
while (performance.now() < end) {
  const t0 = performance.now();
  native.mla(args);
  ms.push(performance.now() - t0);
}
ms.sort((a, b) => a - b);
console.log(
  `${d} ${context}${queries > 1 ? ` x ${queries} queries` : ""}: median ${ms[ms.length >> 1]!.toFixed(2)} ms, min ${ms[0]!.toFixed(2)} (${ms.length} calls)`,
);
