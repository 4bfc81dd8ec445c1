// The MTP layer (ADR 0012) against its golden (scripts/golden/make_mtp_goldens.py: the
// float64 numpy reference of DeepSeek-V3's multi-token-prediction module, as vLLM runs it),
// on both backends: BatchForward.mtpStep over the main model's hidden states, whole prompts
// and chunk by chunk through the paged cache (the MTP layer's own rows in it).
import { copyFileSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import type { Backend } from "../../src/engine/backend.ts";
import { BatchForward } from "../../src/engine/batch.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { BlockKvCache } from "../../src/engine/kv-blocks.ts";
import { heldExperts, loadWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend } from "../../src/engine/reference.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { writeSafetensors } from "../../src/model/safetensors.ts";
import { maxAbsDiff, tinyCheckpointFor } from "../support/golden.ts";

interface MtpGolden {
  tolerance: { relative: number };
  prompts: {
    token_ids: number[];
    next_token: number;
    max_abs_logit: number;
    argmax: number[];
    logits: Float32Array;
  }[];
}

function readMtpGolden(): MtpGolden {
  const raw = JSON.parse(
    readFileSync(new URL("../fixtures/golden/tiny-v3-mtp.json", import.meta.url), "utf8"),
  );
  for (const p of raw.prompts) {
    const b = Buffer.from(p.mtp_logits_f32_b64, "base64");
    p.logits = new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  }
  return raw as MtpGolden;
}

const golden = readMtpGolden();
const dir = await tinyCheckpointFor("tiny-v3-mtp");
const weights = await loadWeights(await Checkpoint.open(dir, { mtp: true }), "all", undefined, {
  mtp: true,
});
const V = weights.config.vocabSize;

const backends: [string, Backend][] = [
  ["native", nativeBackend()],
  ["reference", referenceBackend],
];

/**
 * Runs `tokens` through the main model in chunks of the given sizes, each followed by the
 * MTP step over the chunk's positions (the token after each: the next prompt token, or
 * `next` after the last); resolves the MTP logits of each chunk's last row.
 */
async function mtpByChunks(
  w: ModelWeights,
  backend: Backend,
  tokens: readonly number[],
  next: number,
  sizes: readonly number[],
): Promise<{ main: Float32Array; mtp: Float32Array[] }> {
  const model = new BatchForward(w, backend, new LocalExperts(backend, heldExperts(w)));
  const kv = new BlockKvCache(w.config, { memoryBytes: 2 ** 20, blockSize: 4, extraLayers: 1 });
  const cache = kv.view(0);
  const all = [...tokens, next];
  const mtp: Float32Array[] = [];
  let main: Float32Array = new Float32Array(0);
  let start = 0;
  for (const n of sizes) {
    kv.allocator.reserve(0, start + n);
    let hidden: Float32Array | null = null;
    [main] = (await model.step([
      {
        tokens: tokens.slice(start, start + n),
        cache,
        logits: "last",
        onHidden: (rows) => {
          hidden = rows;
        },
      },
    ])) as [Float32Array];
    const {
      logits: [logits],
    } = await model.mtpStep([
      {
        start,
        tokens: all.slice(start + 1, start + n + 1),
        hidden: hidden!,
        cache,
        logits: "last",
      },
    ]);
    mtp.push(logits!);
    start += n;
  }
  return { main, mtp };
}

describe.each(backends)("MTP layer, %s backend", (_name, backend) => {
  const tol = (p: { max_abs_logit: number }) => golden.tolerance.relative * p.max_abs_logit;
  const row = (p: MtpGolden["prompts"][0], i: number) => p.logits.subarray(i * V, (i + 1) * V);

  it("the whole prompt in one step: the main model's next token and the MTP logits of its last row", async () => {
    for (const p of golden.prompts) {
      const n = p.token_ids.length;
      const { main, mtp } = await mtpByChunks(weights, backend, p.token_ids, p.next_token, [n]);
      let best = 0;
      for (let v = 1; v < V; v++) if (main[v]! > main[best]!) best = v;
      expect(best).toBe(p.next_token);
      expect(maxAbsDiff(mtp[0]!, row(p, n - 1))).toBeLessThanOrEqual(tol(p));
    }
  });

  it("chunk by chunk and token by token, each chunk's last row matches (its rows read the earlier ones from the cache)", async () => {
    const p = golden.prompts[2]!;
    const n = p.token_ids.length;
    const sizes = [7, 1, 9, n - 17];
    const { mtp } = await mtpByChunks(weights, backend, p.token_ids, p.next_token, sizes);
    let end = 0;
    sizes.forEach((s, k) => {
      end += s;
      expect(maxAbsDiff(mtp[k]!, row(p, end - 1))).toBeLessThanOrEqual(tol(p));
    });
    const q = golden.prompts[1]!;
    const ones = q.token_ids.map(() => 1);
    const steps = await mtpByChunks(weights, backend, q.token_ids, q.next_token, ones);
    steps.mtp.forEach((logits, i) => {
      expect(maxAbsDiff(logits, row(q, i))).toBeLessThanOrEqual(tol(q));
    });
  });
});

describe.each(backends)("MTP layer chained on its own output, %s backend", (_name, backend) => {
  it("two more positions from its own hidden state and guess match the golden's extra rows", async () => {
    const p = golden.prompts[1]!;
    const P = p.token_ids.length;
    const model = new BatchForward(
      weights,
      backend,
      new LocalExperts(backend, heldExperts(weights)),
    );
    const kv = new BlockKvCache(weights.config, {
      memoryBytes: 2 ** 20,
      blockSize: 4,
      extraLayers: 1,
    });
    const cache = kv.view(0);
    kv.allocator.reserve(0, P + 2);
    let hidden: Float32Array | null = null;
    await model.step([
      {
        tokens: p.token_ids,
        cache,
        logits: "none",
        onHidden: (rows) => {
          hidden = rows;
        },
      },
    ]);
    let out = await model.mtpStep([
      {
        start: 0,
        tokens: [...p.token_ids.slice(1), p.next_token],
        hidden: hidden!,
        cache,
        logits: "last",
      },
    ]);
    const tol = golden.tolerance.relative * p.max_abs_logit;
    for (let j = 0; j <= 2; j++) {
      const logits = out.logits[0]!;
      expect(
        maxAbsDiff(logits, p.logits.subarray((P - 1 + j) * V, (P + j) * V)),
      ).toBeLessThanOrEqual(tol);
      expect(argmax(logits)).toBe(p.argmax[P - 1 + j]);
      if (j === 2) break;
      out = await model.mtpStep([
        { start: P + j, tokens: [argmax(logits)], hidden: out.hidden[0]!, cache, logits: "last" },
      ]);
    }
  });
});

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

describe("MTP weights", () => {
  it("a checkpoint without an MTP layer refuses MTP loading with EM_CKPT_NO_MTP", async () => {
    const plain = await tinyCheckpointFor("tiny-v3");
    await expect(
      loadWeights(await Checkpoint.open(plain, { mtp: true }), "all", undefined, { mtp: true }),
    ).rejects.toMatchObject({ code: "EM_CKPT_NO_MTP" });
    // Opened without its MTP layer, the MTP checkpoint refuses too, and skips its tensors.
    const ckpt = await Checkpoint.open(dir);
    expect(ckpt.names().some((n) => n.startsWith("model.layers.4."))).toBe(false);
    await expect(loadWeights(ckpt, "all", undefined, { mtp: true })).rejects.toMatchObject({
      code: "EM_CKPT_NO_MTP",
    });
  });

  it("shares the main model's embedding and head when the MTP layer's copies hold the same bytes (as V3's do)", async () => {
    // The tiny checkpoint with the MTP layer's copies replaced by the main model's tensors.
    const src = await Checkpoint.open(dir, { mtp: true });
    const shared = mkdtempSync(join(tmpdir(), "em-mtp-shared-"));
    for (const f of ["config.json", "tokenizer.json", "tokenizer_config.json"])
      copyFileSync(join(dir, f), join(shared, f));
    const copyOf: Record<string, string> = {
      "model.layers.4.embed_tokens.weight": "model.embed_tokens.weight",
      "model.layers.4.shared_head.head.weight": "lm_head.weight",
    };
    const tensors = await Promise.all(
      src.names().map(async (name) => {
        const t = await src.read(copyOf[name] ?? name);
        return { name, dtype: t.dtype, shape: t.shape, data: t.data };
      }),
    );
    await writeSafetensors(join(shared, "model.safetensors"), tensors);
    const w = await loadWeights(await Checkpoint.open(shared, { mtp: true }), "all", undefined, {
      mtp: true,
    });
    expect(w.mtp!.embed).toBe(w.embed);
    expect(w.mtp!.head).toBe(w.lmHead);
    // Different bytes (the random tiny layer's): its own copies.
    expect(weights.mtp!.embed).not.toBe(weights.embed);
    expect(weights.mtp!.head).not.toBe(weights.lmHead);
  });

  it("loads the MTP layer as an MoE block with index num_hidden_layers and its own head", () => {
    const m = weights.mtp!;
    expect(m.layer.index).toBe(weights.config.numHiddenLayers);
    expect(m.layer.moe!.experts.size).toBe(weights.config.nRoutedExperts);
    expect([m.ehProj.rows, m.ehProj.cols]).toEqual([64, 128]);
    expect(m.head).not.toBe(weights.lmHead);
    expect(heldExperts(weights)(4)).toBe(m.layer.moe!.experts);
  });
});
