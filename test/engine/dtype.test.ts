// Serving a checkpoint's linear layers in another dtype (--dtype, spec.model.dtype): the
// loader's conversions against the TypeScript quantizer and dequantizer (floats.ts,
// reference.ts) value for value, and the forward pass on the converted weights against the
// goldens: lossless conversions within the goldens' tolerance, lossy ones within what their
// rounding costs, fp8 on both backends alike.
import { describe, expect, it } from "vitest";
import type { Weight } from "../../src/engine/backend.ts";
import { LocalExperts } from "../../src/engine/experts.ts";
import { generate } from "../../src/engine/generate.ts";
import { heldExperts, loadWeights, type ModelWeights } from "../../src/engine/loader.ts";
import { DeepSeekForward, SequenceCache } from "../../src/engine/model.ts";
import { nativeBackend } from "../../src/engine/native.ts";
import { referenceBackend, weightToF32 } from "../../src/engine/reference.ts";
import { parseServeDtype, type ServeDtype } from "../../src/engine/weight-dtype.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { float32ArrayToBf16, quantizeE4m3Blocks } from "../../src/model/floats.ts";
import { maxAbsDiff, readGolden, tinyCheckpointFor } from "../support/golden.ts";

const native = nativeBackend();

async function load(name: "tiny-v2" | "tiny-v3" | "tiny-v3-fp8", dtype: ServeDtype) {
  return loadWeights(await Checkpoint.open(await tinyCheckpointFor(name)), "all", undefined, {
    dtype,
  });
}

/** Every linear layer's weight (what --dtype converts), with a name, in a fixed order. */
function linears(w: ModelWeights): [string, Weight][] {
  const out: [string, Weight][] = [];
  const mlp = (p: string, m: { gate: Weight; up: Weight; down: Weight }) =>
    out.push([`${p}.gate`, m.gate], [`${p}.up`, m.up], [`${p}.down`, m.down]);
  for (const l of w.layers) {
    for (const [k, v] of Object.entries(l.attention))
      if (!k.endsWith("Norm")) out.push([`${l.index}.${k}`, v as Weight]);
    if (l.mlp) mlp(`${l.index}.mlp`, l.mlp);
    if (l.moe?.shared) mlp(`${l.index}.shared`, l.moe.shared);
    for (const [e, m] of l.moe?.experts ?? []) mlp(`${l.index}.expert${e}`, m);
  }
  return out;
}

/** The weights --dtype leaves alone. */
function others(w: ModelWeights): [string, Weight][] {
  return [
    ["embed", w.embed],
    ["lmHead", w.lmHead],
    ["norm", w.norm],
    ...w.layers.flatMap((l): [string, Weight][] => [
      [`${l.index}.inputNorm`, l.inputNorm],
      [`${l.index}.postNorm`, l.postNorm],
      [`${l.index}.kvANorm`, l.attention.kvANorm],
      ...(l.moe ? [[`${l.index}.router`, l.moe.router] as [string, Weight]] : []),
    ]),
  ];
}

/** Worst |logits - golden| / max|logit| over the golden's prompts. */
async function goldenError(w: ModelWeights, golden: string, backend = native): Promise<number> {
  const model = new DeepSeekForward(w, backend, new LocalExperts(backend, heldExperts(w)));
  let worst = 0;
  for (const p of readGolden(golden as "tiny-v3").prompts) {
    const logits = await model.forward(p.token_ids, new SequenceCache(w.config));
    worst = Math.max(worst, maxAbsDiff(logits, p.logits) / p.max_abs_logit);
  }
  return worst;
}

describe("--dtype", () => {
  it("parses the five dtypes and refuses others with EM_CLI_USAGE", () => {
    expect(parseServeDtype(undefined)).toBe("auto");
    for (const d of ["auto", "bf16", "fp16", "fp32", "fp8"]) expect(parseServeDtype(d)).toBe(d);
    for (const bad of ["f16", "float8", "FP8", ""])
      expect(() => parseServeDtype(bad)).toThrow(
        expect.objectContaining({ code: "EM_CLI_USAGE", message: expect.stringContaining(bad) }),
      );
  });

  it("fp8 quantizes every linear layer of a bf16 checkpoint as floats.ts does, and nothing else", async () => {
    const auto = await load("tiny-v3", "auto");
    const fp8 = await load("tiny-v3", "fp8");
    const [a, q] = [linears(auto), linears(fp8)];
    expect(q.map(([n]) => n)).toEqual(a.map(([n]) => n));
    expect(a.length).toBeGreaterThan(60);
    for (const [i, [name, w]] of q.entries()) {
      const src = a[i]![1];
      expect(src.dtype, name).toBe("bf16");
      const want = quantizeE4m3Blocks(weightToF32(src), src.rows, src.cols);
      expect([w.dtype, w.rows, w.cols], name).toEqual(["fp8", src.rows, src.cols]);
      expect(Buffer.from(w.data.buffer, w.data.byteOffset, w.data.byteLength)).toEqual(
        Buffer.from(want.codes),
      );
      expect(w.scaleInv, name).toEqual(want.scaleInv);
    }
    const kept = others(auto);
    for (const [i, [name, w]] of others(fp8).entries()) {
      expect(w.dtype, name).toBe("bf16");
      expect(w.data, name).toEqual(kept[i]![1].data);
    }
  });

  it("bf16, fp16 and fp32 dequantize an fp8 checkpoint's linear layers exactly as the reference does", async () => {
    const auto = await load("tiny-v3-fp8", "auto");
    const ref = linears(auto).map(([, w]) => weightToF32(w));
    for (const dtype of ["fp32", "bf16"] as const) {
      const got = linears(await load("tiny-v3-fp8", dtype));
      for (const [i, [name, w]] of got.entries()) {
        expect(w.dtype, name).toBe(dtype === "fp32" ? "f32" : "bf16");
        expect(w.data, name).toEqual(dtype === "fp32" ? ref[i] : float32ArrayToBf16(ref[i]!));
      }
    }
    const f16 = linears(await load("tiny-v3-fp8", "fp16"));
    expect(new Set(f16.map(([, w]) => w.dtype))).toEqual(new Set(["f16"]));
  });

  it("lossless conversions keep the goldens within their 1e-4 x max|logit|", async () => {
    // bf16 values are exact in f32 and f16 (these weights are far from f16's limits), and
    // an fp8 weight times its scale is exact in f32.
    for (const [name, dtype] of [
      ["tiny-v3", "fp32"],
      ["tiny-v3", "fp16"],
      ["tiny-v2", "fp32"],
      ["tiny-v3-fp8", "fp32"],
    ] as const)
      expect(
        await goldenError(await load(name, dtype), name),
        `${name} as ${dtype}`,
      ).toBeLessThanOrEqual(1e-4);
  });

  it("an fp8 checkpoint served in bf16 costs bf16's rounding of the dequantized weights", async () => {
    // Measured 8.3e-3 (each weight rounded by up to 2^-9 of itself, through 4 random layers).
    expect(await goldenError(await load("tiny-v3-fp8", "bf16"), "tiny-v3-fp8")).toBeLessThan(2e-2);
  });

  it("a bf16 checkpoint served in fp8 runs alike on both backends, and greedy decoding works", async () => {
    const w = await load("tiny-v3", "fp8");
    const golden = readGolden("tiny-v3");
    const models = [native, referenceBackend].map(
      (b) => new DeepSeekForward(w, b, new LocalExperts(b, heldExperts(w))),
    );
    for (const p of golden.prompts) {
      const [n, r] = await Promise.all(
        models.map((m) => m.forward(p.token_ids, new SequenceCache(w.config))),
      );
      expect(maxAbsDiff(n!, r!)).toBeLessThanOrEqual(1e-4 * p.max_abs_logit);
    }
    // The same tokens from both: the quantized model is one model, whichever backend runs it.
    const prompt = golden.prompts[golden.greedy.prompt_index]!.token_ids;
    const [n, r] = await Promise.all(models.map((m) => generate(m, prompt, { maxTokens: 16 })));
    expect(n!.tokens).toHaveLength(16);
    expect(n!.tokens).toEqual(r!.tokens);
  });
});
