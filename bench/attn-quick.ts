// Quick check of one MLA decode attention call (paged, V3 latent): ms per call for a dtype
// and context, for A/B runs with EM_NATIVE_ADDON. Not a suite: bench/kv-cache.ts is.
// usage: node bench/attn-quick.ts DTYPE CONTEXT SECONDS
import { encodeKvRows, type KvDtype, kvRowBytes } from "../src/engine/kv-format.ts";
import { nativeBackend } from "../src/engine/native.ts";
import { float32ToBf16 } from "../src/model/floats.ts";
import { Prng } from "../src/model/prng.ts";

const [dtype = "f32", ctxArg = "8192", secsArg = "5"] = process.argv.slice(2);
const d = dtype as KvDtype;
const context = Number(ctxArg);
const H = 16,
  DN = 128,
  DR = 64,
  DV = 128,
  C = 512,
  W = C + DR,
  BATCH = 8,
  BLOCK = 16;
const rng = new Prng(1);
const native = nativeBackend();
const wf = new Float32Array(H * (DN + DV) * C);
rng.fillNormal(wf, 0.05);
const wkvB = {
  dtype: "bf16" as const,
  data: Uint16Array.from(wf, float32ToBf16),
  rows: H * (DN + DV),
  cols: C,
};
const blocksPer = Math.ceil(context / BLOCK);
const numBlocks = BATCH * blocksPer;
const order = Array.from({ length: numBlocks }, (_, i) => i).sort(() => rng.uniform() - 0.5);
const rb = kvRowBytes(d, C, DR);
const pool = new Uint8Array(numBlocks * BLOCK * rb);
const latent = new Float32Array(BLOCK * W);
for (let b = 0; b < numBlocks; b++) {
  rng.fillNormal(latent, 1);
  encodeKvRows(d, C, DR, latent, pool, b * BLOCK * rb);
}
const q = new Float32Array(BATCH * H * (DN + DR));
rng.fillNormal(q, 1);
const args = {
  heads: H,
  nopeDim: DN,
  ropeDim: DR,
  vDim: DV,
  kvLoraRank: C,
  softmaxScale: (DN + DR) ** -0.5,
  wkvB,
  q,
  positions: Int32Array.from({ length: BATCH }, () => context - 1),
  qOffsets: Int32Array.from({ length: BATCH + 1 }, (_, i) => i),
  pages: { dtype: d, pool, blockSize: BLOCK },
  table: Int32Array.from(order),
  tableOffsets: Int32Array.from({ length: BATCH + 1 }, (_, s) => s * blocksPer),
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
  `${d} ${context}: median ${ms[ms.length >> 1]!.toFixed(2)} ms, min ${ms[0]!.toFixed(2)} (${ms.length} calls)`,
);
