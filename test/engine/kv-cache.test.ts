// The latent KV cache's storage dtypes (kv-format.ts: f32, bf16, DeepSeek FlashMLA's fp8)
// and its paged attention: the row codecs, native paged attention against the TypeScript
// reference on the same pages, the block cache against one-block caches through the
// forward pass, and what bf16 / fp8 rows cost the tiny models against the goldens.
import { describe, expect, it } from "vitest";
import type { KvPages, Weight } from "../../src/engine/backend.ts";
import { BatchForward, type LatentCache } from "../../src/engine/batch.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { BlockKvCache, bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import {
  decodeKvRows,
  encodeKvRows,
  encodeKvRowsPortable,
  type KvDtype,
  kvRowBytes,
  parseKvCacheDtype,
  writeKvBytes,
} from "../../src/engine/kv-format.ts";
import { heldExperts } from "../../src/engine/loader.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { loadAddon, nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import { bf16ToFloat32, float32ToBf16 } from "../../src/model/floats.ts";
import { Prng } from "../../src/model/prng.ts";
import { localModel, maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";

const DTYPES: KvDtype[] = ["f32", "bf16", "fp8"];

function randomRows(rng: Prng, n: number, width: number, range = 3): Float32Array {
  return Float32Array.from({ length: n * width }, () => (rng.uniform() * 2 - 1) * range);
}

describe("row formats", () => {
  it("row sizes agree with the native kernels' (FlashMLA's 656 bytes for V3's fp8 rows)", () => {
    const addon = loadAddon();
    for (const [C, dr] of [
      [32, 8],
      [512, 64],
      [200, 8],
    ] as const)
      for (const d of DTYPES) expect(kvRowBytes(d, C, dr)).toBe(addon.kvRowBytes(d, C, dr));
    expect(kvRowBytes("fp8", 512, 64)).toBe(656);
    expect(kvRowBytes("f32", 512, 64) / kvRowBytes("fp8", 512, 64)).toBeCloseTo(3.51, 2);
  });

  it("names: vLLM's spellings, a clear error otherwise", () => {
    expect(parseKvCacheDtype("float32")).toBe("f32");
    expect(parseKvCacheDtype("bfloat16")).toBe("bf16");
    expect(parseKvCacheDtype("fp8")).toBe("fp8");
    expect(parseKvCacheDtype("fp8_e4m3")).toBe("fp8");
    expect(() => parseKvCacheDtype("fp8_e5m2")).toThrow(
      expect.objectContaining({ code: "EM_CLI_USAGE" }),
    );
  });

  it("the native encoder writes the TypeScript encoder's bytes", () => {
    const addon = loadAddon();
    const rng = new Prng(9);
    for (const [C, dr] of [
      [32, 8],
      [512, 64],
      [200, 8],
      [45, 6],
    ] as const) {
      const W = C + dr;
      const n = 7;
      const rows = randomRows(rng, n, W);
      rows.fill(0, 0, C); // an all-zero latent
      for (let c = 0; c < C; c += 3) rows[W + c] = (rng.uniform() - 0.5) * 2e-4; // subnormal codes
      rows[2 * W] = 1e30; // a block whose other values all flush to zero
      for (let c = 0; c < C; c += 5) rows[3 * W + c] = 2 ** Math.floor(rng.uniform() * 10 - 5); // powers of two
      for (const d of DTYPES) {
        const size = 8 + n * kvRowBytes(d, C, dr);
        const a = new Uint8Array(size).fill(0xaa);
        const b = new Uint8Array(size).fill(0xaa);
        addon.kvEncode(d, C, dr, rows, a, 4);
        encodeKvRowsPortable(d, C, dr, rows, b, 4);
        expect(Buffer.from(a).equals(Buffer.from(b)), `${d} ${C}+${dr}`).toBe(true);
      }
    }
    expect(() => addon.kvEncode("fp8", 32, 8, new Float32Array(40), new Uint8Array(50), 0)).toThrow(
      /out holds 50 bytes, the rows need 52/,
    );
  });

  it("the addon's kvWrite copies encoded rows into a pool, and refuses a range past it", () => {
    const rng = new Prng(4);
    const src = Uint8Array.from({ length: 40 }, () => Math.floor(rng.uniform() * 256));
    const pool = new Uint8Array(100);
    writeKvBytes(src, pool, 60);
    expect(pool.subarray(60)).toEqual(src);
    expect(pool.subarray(0, 60).every((b) => b === 0)).toBe(true);
    expect(() => loadAddon().kvWrite(src, pool, 61)).toThrow(/EM_NATIVE_SHAPE|holds 100 bytes/);
  });

  it("f32 is exact, bf16 rounds to nearest even, fp8 is within half a step of e4m3", () => {
    const rng = new Prng(5);
    const C = 200;
    const dr = 8;
    const W = C + dr;
    const n = 5;
    const rows = randomRows(rng, n, W);
    rows.fill(0, 2 * W, 2 * W + C); // a zero latent: scale 1, zeros back
    rows[3 * W + 7] = 1e-6; // far below its block's amax: flushes towards 0
    for (const d of DTYPES) {
      const bytes = new Uint8Array(4 + n * kvRowBytes(d, C, dr));
      encodeKvRows(d, C, dr, rows, bytes, 4);
      const back = decodeKvRows(d, C, dr, bytes, 4, n);
      for (let r = 0; r < n; r++)
        for (let b = 0; b < 2; b++) {
          const c1 = Math.min(C, (b + 1) * 128);
          let amax = 0;
          for (let c = b * 128; c < c1; c++) amax = Math.max(amax, Math.abs(rows[r * W + c]!));
          for (let c = b * 128; c < c1; c++) {
            const x = rows[r * W + c]!;
            const y = back[r * W + c]!;
            if (d === "f32") expect(y).toBe(x);
            else if (d === "bf16") expect(y).toBe(bf16ToFloat32(float32ToBf16(x)));
            else {
              // e4m3: 3 mantissa bits (relative step 1/8 of the binade), subnormals 2^-9 apart
              // in units of the scale amax / 448.
              const scale = amax / 448;
              expect(Math.abs(y - x)).toBeLessThanOrEqual(
                Math.abs(x) / 16 + scale * 2 ** -10 + 1e-12,
              );
              if (Math.abs(x) === amax) expect(y).toBeCloseTo(x, 5);
            }
          }
        }
      // The rope part: f32 exact, bf16 otherwise.
      for (let r = 0; r < n; r++)
        for (let i = C; i < W; i++) {
          const x = rows[r * W + i]!;
          expect(back[r * W + i]).toBe(d === "f32" ? x : bf16ToFloat32(float32ToBf16(x)));
        }
    }
  });
});

describe("paged MLA attention", () => {
  const H = 4;
  const dn = 16;
  const dr = 8;
  const dv = 12;
  const C = 136; // two fp8 scales per row, the second over 8 values
  const W = C + dr;

  /** Sequences' rows in shuffled blocks of one pool; q; positions. */
  function batch(rng: Prng, d: KvDtype, blockSize: number, seqs: [number, number][]) {
    const rowBytes = kvRowBytes(d, C, dr);
    const blocksOf = seqs.map(([rows]) => Math.ceil(rows / blockSize));
    const numBlocks = blocksOf.reduce((a, b) => a + b, 0) + 2;
    const order = Array.from({ length: numBlocks }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(rng.uniform() * (i + 1));
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    const pool = new Uint8Array(numBlocks * blockSize * rowBytes).fill(0xee);
    const table: number[] = [];
    const tableOffsets = [0];
    const positions: number[] = [];
    const qOffsets = [0];
    let next = 0;
    for (const [rows, queries] of seqs) {
      const data = randomRows(rng, rows, W, 1);
      for (let r = 0; r < rows; r += blockSize) {
        const b = order[next++]!;
        table.push(b);
        const n = Math.min(blockSize, rows - r);
        encodeKvRows(d, C, dr, data.subarray(r * W, (r + n) * W), pool, b * blockSize * rowBytes);
      }
      tableOffsets.push(table.length);
      for (let p = rows - queries; p < rows; p++) positions.push(p);
      qOffsets.push(positions.length);
    }
    const pages: KvPages = { dtype: d, pool, blockSize };
    return {
      pages,
      table: Int32Array.from(table),
      tableOffsets: Int32Array.from(tableOffsets),
      positions: Int32Array.from(positions),
      qOffsets: Int32Array.from(qOffsets),
      q: randomRows(rng, positions.length, H * (dn + dr), 1),
    };
  }

  it.each(DTYPES)("native reads %s pages as the reference does", (d) => {
    const rng = new Prng(11);
    const native = nativeBackend();
    for (const wdtype of ["f32", "bf16"] as const) {
      const w = randomRows(rng, H * (dn + dv), C, 0.2);
      const wkvB: Weight =
        wdtype === "f32"
          ? { dtype: "f32", data: w, rows: H * (dn + dv), cols: C }
          : {
              dtype: "bf16",
              data: Uint16Array.from(w, float32ToBf16),
              rows: H * (dn + dv),
              cols: C,
            };
      for (const [blockSize, seqs] of [
        [4, [[9, 9]]], // prefill
        [
          16,
          [
            [37, 1],
            [3, 1],
            [16, 5],
          ],
        ], // decode, a partial block, a chunk
        [
          5,
          [
            [23, 4],
            [1, 1],
          ],
        ],
        // A prefill chunk of 200 tokens (the multi-head form: shards/cpu/attention.cpp takes
        // it from 32 query tokens at these dims) beside a decoding sequence.
        [
          16,
          [
            [300, 200],
            [20, 1],
          ],
        ],
      ] as [number, [number, number][]][]) {
        const b = batch(rng, d, blockSize, seqs);
        const args = {
          heads: H,
          nopeDim: dn,
          ropeDim: dr,
          vDim: dv,
          kvLoraRank: C,
          softmaxScale: (dn + dr) ** -0.5,
          wkvB,
          ...b,
        };
        const want = referenceBackend.mla(args);
        const got = native.mla(args);
        let scale = 0;
        for (const v of want) scale = Math.max(scale, Math.abs(v));
        expect(maxAbsDiff(got, want)).toBeLessThanOrEqual(1e-4 * scale);
      }
    }
  });
});

describe("the block cache through the forward pass", () => {
  it.each(DTYPES)(
    "%s: blocks of 4 in one batch = each sequence in a cache of its own",
    async (d) => {
      const { weights } = await localModel(await tinyCheckpointFor("tiny-v3"), nativeBackend());
      const backend = nativeBackend();
      const model = new BatchForward(
        weights,
        backend,
        new LocalExperts(backend, heldExperts(weights)),
      );
      const c = weights.config;
      const V = c.vocabSize;
      const rng = new Prng(3);
      const prompts = [13, 6, 21].map((n) =>
        Array.from({ length: n }, () => Math.floor(rng.uniform() * V)),
      );
      const blocks = new BlockKvCache(c, {
        blockSize: 4,
        memoryBytes: 32 * bytesPerBlock(c, 4, d),
        dtype: d,
      });
      expect(blocks.allocator.numBlocks).toBe(32);
      expect(blocks.bytesPerToken).toBe(
        kvRowBytes(d, c.kvLoraRank, c.qkRopeHeadDim) * c.numHiddenLayers,
      );
      const paged: LatentCache[] = prompts.map((_, i) => blocks.view(i));
      const own: LatentCache[] = prompts.map(() => new SequenceCache(c, 4, d));
      // Prefill in two chunks, then three decode steps, all sequences in each step.
      const run = async (caches: LatentCache[]) => {
        const out: Float32Array[] = [];
        for (const [from, to] of [
          [0, 5],
          [5, 21],
        ] as const) {
          const items = prompts.map((p, i) => ({
            tokens: p.slice(Math.min(from, p.length), Math.min(to, p.length)),
            cache: caches[i]!,
            logits: "last" as const,
          }));
          items.forEach((it, i) => {
            if (caches === paged) blocks.allocator.reserve(i, caches[i]!.length + it.tokens.length);
          });
          const live = items.filter((it) => it.tokens.length > 0);
          const logits = await model.step(live);
          live.forEach((it) => {
            it.cache.setLength(it.cache.length + it.tokens.length);
          });
          out.push(...logits);
        }
        for (let step = 0; step < 3; step++) {
          const items = prompts.map((p, i) => ({
            tokens: [p[step]!],
            cache: caches[i]!,
            logits: "last" as const,
          }));
          if (caches === paged)
            caches.forEach((cache, i) => {
              blocks.allocator.reserve(i, cache.length + 1);
            });
          out.push(...(await model.step(items)));
          items.forEach((it) => {
            it.cache.setLength(it.cache.length + 1);
          });
        }
        return out;
      };
      const a = await run(paged);
      const b = await run(own);
      expect(a.length).toBe(b.length);
      a.forEach((x, i) => {
        let m = 0;
        for (const v of b[i]!) m = Math.max(m, Math.abs(v));
        expect(maxAbsDiff(x, b[i]!)).toBeLessThanOrEqual(1e-5 * m);
      });
    },
  );
});

describe("what a smaller cache costs the tiny models", () => {
  // Measured 2026-11-29 (native, all prompts): bf16 3.5e-3-3.6e-3 x max|logit|; fp8
  // 0.15 (V2), 0.47-0.49 (V3) x max|logit|: a random tiny model's attention is far more
  // sensitive than a trained one's (kv_lora_rank 32: one scale for the whole latent).
  const models = ["tiny-v2", "tiny-v3", "tiny-v3-fp8"] as const;

  it.each(models)("%s: bf16 rows keep the logits within 1e-2 x max|logit|", async (name) => {
    const golden = readGolden(name);
    const { weights, model } = await localModel(await tinyCheckpointFor(name), nativeBackend());
    for (const p of golden.prompts) {
      const logits = await model.forward(
        p.token_ids,
        new SequenceCache(weights.config, 64, "bf16"),
      );
      expect(maxAbsDiff(logits, p.logits)).toBeLessThanOrEqual(1e-2 * p.max_abs_logit);
    }
  });

  it.each(models)(
    "%s: fp8 rows differ from f32 ones, and decoding reads them as prefill does",
    async (name) => {
      const golden = readGolden(name);
      const { weights, model } = await localModel(await tinyCheckpointFor(name), nativeBackend());
      const p = golden.prompts[1]!;
      const full = await model.forward(p.token_ids, new SequenceCache(weights.config, 64, "fp8"));
      // Quantized: not the f32 logits (a cache that silently stored f32 would pass the rest).
      expect(maxAbsDiff(full, p.logits)).toBeGreaterThan(1e-3 * p.max_abs_logit);
      const cache = new SequenceCache(weights.config, 1, "fp8");
      const V = weights.config.vocabSize;
      for (let t = 0; t < p.token_ids.length; t++) {
        const step = await model.forward([p.token_ids[t]!], cache);
        expect(maxAbsDiff(step, full.subarray(t * V, (t + 1) * V))).toBeLessThanOrEqual(
          1e-4 * p.max_abs_logit,
        );
      }
    },
  );
});
