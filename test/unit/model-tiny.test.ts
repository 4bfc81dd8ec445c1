import { spawnSync } from "node:child_process";
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { resolveArchitecture } from "../../src/api/presets.ts";
import { makeTinyModelCommand } from "../../src/cli/commands/make-tiny-model.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { modelArchitectureOf, parseModelConfig } from "../../src/model/config.ts";
import { bf16ArrayToFloat32, dequantizeE4m3Blocks } from "../../src/model/floats.ts";
import { Prng } from "../../src/model/prng.ts";
import { tinyConfigJson, tinyModelCurrent, writeTinyModel } from "../../src/model/tiny.ts";
import { modelWeights, scaleInvOf } from "../../src/model/weights.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { makeDirs } from "../../src/util/fs.ts";

// biome-ignore lint/suspicious/noApproximativeNumericConstant: the literal of DeepSeek-V2's config.json
const V2_MSCALE = 0.707;
const isLinear = (name: string) => /_proj(_with_mqa)?\.weight$/.test(name);
const repo = fileURLToPath(new URL("../../", import.meta.url));
const root = mkdtempSync(join(tmpdir(), "em-tiny-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
const dirs = new Map<string, string>();

/** Writes (once) the tiny model named by its options and returns its directory. */
async function model(
  arch: "v2" | "v3",
  extra: { seed?: number; fp8?: boolean; shards?: number } = {},
) {
  const key = JSON.stringify({ arch, ...extra });
  let dir = dirs.get(key);
  if (!dir) {
    dir = mkdtempSync(join(root, `${arch}-`));
    await writeTinyModel(dir, { arch, ...extra });
    dirs.set(key, dir);
  }
  return dir;
}

/** The expected tensors of a tiny model, written out from the figures by hand. */
function expectedTensors(arch: "v2" | "v3"): Map<string, { shape: number[]; dtype: string }> {
  const v3 = arch === "v3";
  const out = new Map<string, { shape: number[]; dtype: string }>();
  const add = (name: string, shape: number[], dtype = "BF16") => out.set(name, { shape, dtype });
  add("model.embed_tokens.weight", [320, 64]);
  const layers = v3 ? 4 : 3;
  for (let i = 0; i < layers; i++) {
    const p = `model.layers.${i}`;
    add(`${p}.input_layernorm.weight`, [64]);
    if (v3) {
      add(`${p}.self_attn.q_a_proj.weight`, [32, 64]);
      add(`${p}.self_attn.q_a_layernorm.weight`, [32]);
      add(`${p}.self_attn.q_b_proj.weight`, [4 * 24, 32]);
    } else {
      add(`${p}.self_attn.q_proj.weight`, [4 * 24, 64]);
    }
    add(`${p}.self_attn.kv_a_proj_with_mqa.weight`, [32 + 8, 64]);
    add(`${p}.self_attn.kv_a_layernorm.weight`, [32]);
    add(`${p}.self_attn.kv_b_proj.weight`, [4 * (16 + 16), 32]);
    add(`${p}.self_attn.o_proj.weight`, [64, 4 * 16]);
    add(`${p}.post_attention_layernorm.weight`, [64]);
    const mlp = (q: string, inner: number) => {
      add(`${q}.gate_proj.weight`, [inner, 64]);
      add(`${q}.up_proj.weight`, [inner, 64]);
      add(`${q}.down_proj.weight`, [64, inner]);
    };
    if (i === 0) {
      mlp(`${p}.mlp`, 128);
      continue;
    }
    const experts = v3 ? 16 : 8;
    add(`${p}.mlp.gate.weight`, [experts, 64]);
    if (v3) add(`${p}.mlp.gate.e_score_correction_bias`, [16], "F32");
    for (let j = 0; j < experts; j++) mlp(`${p}.mlp.experts.${j}`, 32);
    mlp(`${p}.mlp.shared_experts`, v3 ? 32 : 64);
  }
  add("model.norm.weight", [64]);
  add("lm_head.weight", [320, 64]);
  return out;
}

describe.each(["v2", "v3"] as const)("tiny-%s checkpoint", (arch) => {
  let ckpt: Checkpoint;
  beforeAll(async () => {
    ckpt = await Checkpoint.open(await model(arch));
  });

  it("holds every tensor of the Hugging Face layout with its shape and dtype", () => {
    const want = expectedTensors(arch);
    expect(ckpt.names()).toEqual([...want.keys()].sort());
    for (const [name, { shape, dtype }] of want) {
      expect(ckpt.tensorInfo(name), name).toMatchObject({ shape, dtype });
    }
  });

  it("has a config that matches the preset and the figures of the brief", () => {
    const c = ckpt.config;
    expect(modelArchitectureOf(c)).toEqual(resolveArchitecture(`tiny-${arch}`));
    expect(c).toMatchObject(
      arch === "v3"
        ? {
            architecture: "DeepseekV3ForCausalLM",
            qLoraRank: 32,
            topkMethod: "noaux_tc",
            scoringFunc: "sigmoid",
            normTopkProb: true,
            routedScalingFactor: 2.5,
            nGroup: 4,
            topkGroup: 2,
            numNextnPredictLayers: 0,
            ropeScaling: {
              factor: 4,
              originalMaxPositionEmbeddings: 64,
              mscale: 1,
              mscaleAllDim: 1,
            },
          }
        : {
            architecture: "DeepseekV2ForCausalLM",
            qLoraRank: null,
            topkMethod: "group_limited_greedy",
            scoringFunc: "softmax",
            normTopkProb: false,
            routedScalingFactor: 1,
            nGroup: 2,
            topkGroup: 1,
            ropeScaling: { factor: 4, originalMaxPositionEmbeddings: 64, mscale: V2_MSCALE },
          },
    );
    expect(c).toMatchObject({
      vocabSize: 320, // 319 tokens rounded up to a multiple of 64
      maxPositionEmbeddings: 256, // > original 64: YaRN is active
      rmsNormEps: 1e-6,
      ropeTheta: 10000,
      tieWordEmbeddings: false,
      torchDtype: "bfloat16",
      bosTokenId: 0,
      eosTokenIds: [1],
    });
    const dir = ckpt.dir;
    for (const f of ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]) {
      expect(existsSync(join(dir, f))).toBe(true);
    }
    const tc = JSON.parse(readFileSync(join(dir, "tokenizer_config.json"), "utf8"));
    expect(tc).toMatchObject({
      add_bos_token: true,
      bos_token: { content: "<｜begin▁of▁sentence｜>" },
    });
  });

  it("scales Linear weights so a unit-RMS input gives a unit-RMS output", async () => {
    const rng = new Prng(1, "x");
    for (const name of ckpt.names().filter((n) => isLinear(n) || n.endsWith("lm_head.weight"))) {
      const t = await ckpt.read(name);
      const [rows, cols] = t.shape as [number, number];
      const w = bf16ArrayToFloat32(t.data as Uint16Array);
      const x = rng.fillNormal(new Float32Array(cols));
      let sq = 0;
      for (let r = 0; r < rows; r++) {
        let y = 0;
        for (let c = 0; c < cols; c++) y += w[r * cols + c]! * x[c]!;
        sq += y * y;
      }
      const rms = Math.sqrt(sq / rows);
      expect(rms, name).toBeGreaterThan(0.5);
      expect(rms, name).toBeLessThan(2);
    }
  });
});

describe("determinism", () => {
  const files = (dir: string) => readdirSync(dir).sort();
  it("gives byte-identical files for the same seed and different weights for another", async () => {
    const a = await model("v3", { seed: 7 });
    const b = mkdtempSync(join(root, "again-"));
    await writeTinyModel(b, { arch: "v3", seed: 7 });
    expect(files(b)).toEqual(files(a));
    for (const f of files(a))
      expect(readFileSync(join(b, f)).equals(readFileSync(join(a, f))), f).toBe(true);
    const c = await model("v3", { seed: 8 });
    expect(readFileSync(join(c, "config.json"))).toEqual(readFileSync(join(a, "config.json")));
    expect(
      readFileSync(join(c, "model.safetensors")).equals(readFileSync(join(a, "model.safetensors"))),
    ).toBe(false);
  });

  it("tells a checkpoint written now from one an older version wrote (expertmesh up rewrites those)", async () => {
    const dir = await model("v3");
    expect(tinyModelCurrent(dir, { arch: "v3" })).toBe(true);
    expect(tinyModelCurrent(dir, { arch: "v2" })).toBe(false);
    expect(tinyModelCurrent(dir, { arch: "v3", fp8: true })).toBe(false);
    const path = join(dir, "tokenizer.json");
    const tokenizer = JSON.parse(readFileSync(path, "utf8")) as { added_tokens: unknown[] };
    tokenizer.added_tokens = tokenizer.added_tokens.slice(0, 5);
    writeFileSync(path, `${JSON.stringify(tokenizer, null, 2)}\n`);
    expect(tinyModelCurrent(dir, { arch: "v3" })).toBe(false);
    expect(tinyModelCurrent(join(dir, "nope"), { arch: "v3" })).toBe(false);
  });

  it("gives the same tensors whatever the sharding", async () => {
    const single = await Checkpoint.open(await model("v2"));
    const sharded = await Checkpoint.open(await model("v2", { shards: 3 }));
    for (const name of single.names()) {
      const [x, y] = await Promise.all([single.read(name), sharded.read(name)]);
      expect(Buffer.from(y.data.buffer).equals(Buffer.from(x.data.buffer)), name).toBe(true);
    }
  });

  it("removes old weight files so a single file is not shadowed by an old index", async () => {
    const dir = mkdtempSync(join(root, "reuse-"));
    await writeTinyModel(dir, { arch: "v2", shards: 2 });
    await writeTinyModel(dir, { arch: "v2" });
    expect(files(dir)).toEqual([
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
  });
});

describe("fp8 checkpoints", () => {
  it("store Linear weights as e4m3 with block scales that dequantize to the bf16 weights", async () => {
    const fp8 = await Checkpoint.open(await model("v3", { fp8: true }));
    const bf16 = await Checkpoint.open(await model("v3"));
    expect(fp8.config.quantization).toMatchObject({
      quantMethod: "fp8",
      weightBlockSize: [128, 128],
    });
    const dtypeOf = (n: string) => fp8.tensorInfo(n).dtype;
    expect(dtypeOf("model.embed_tokens.weight")).toBe("BF16");
    expect(dtypeOf("lm_head.weight")).toBe("BF16");
    expect(dtypeOf("model.layers.1.mlp.gate.weight")).toBe("BF16");
    expect(dtypeOf("model.layers.1.mlp.gate.e_score_correction_bias")).toBe("F32");
    expect(dtypeOf("model.layers.1.self_attn.kv_a_layernorm.weight")).toBe("BF16");
    for (const name of bf16.names().filter((n) => isLinear(n))) {
      expect(dtypeOf(name), name).toBe("F8_E4M3");
      const [rows, cols] = fp8.tensorInfo(name).shape as [number, number];
      const scale = await fp8.read(`${name}_scale_inv`, {
        shape: [Math.ceil(rows / 128), Math.ceil(cols / 128)],
        dtypes: ["F32"],
      });
      const codes = await fp8.read(name, { dtypes: ["F8_E4M3"] });
      const deq = dequantizeE4m3Blocks(
        { codes: codes.data as Uint8Array, scaleInv: scale.data as Float32Array },
        rows,
        cols,
      );
      const ref = bf16ArrayToFloat32((await bf16.read(name)).data as Uint16Array);
      const amax = ref.reduce((a, v) => Math.max(a, Math.abs(v)), 0);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) {
        // e4m3 (3 mantissa bits) and bf16 (8) roundings of the same float32 value.
        const bound = Math.abs(ref[i]!) / 12 + amax / 448 / 512 + 1e-9;
        worst = Math.max(worst, Math.abs(deq[i]! - ref[i]!) / bound);
      }
      expect(worst, name).toBeLessThanOrEqual(1);
    }
    expect(fp8.names().filter((n) => n.endsWith("_scale_inv")).length).toBe(
      bf16.names().filter((n) => isLinear(n)).length,
    );
  });

  it("size the scale grids as ceil(out/128) x ceil(in/128) on the mini figures", () => {
    const c = parseModelConfig(tinyConfigJson("v3", "mini", true));
    const byName = new Map(modelWeights(c).map((w) => [w.name, w]));
    expect(
      scaleInvOf(byName.get("model.layers.1.self_attn.kv_a_proj_with_mqa.weight")!).shape,
    ).toEqual([3, 8]); // [288, 1024]
    expect(scaleInvOf(byName.get("model.layers.1.mlp.experts.0.down_proj.weight")!).shape).toEqual([
      8, 3,
    ]); // [1024, 384]
  });
});

describe("routing exercised by the tiny weights", () => {
  /** Experts chosen for one token: group-limited top-k over `scores + bias`. */
  function route(
    scores: number[],
    bias: number[],
    groups: number,
    topkGroup: number,
    k: number,
    sumTop2: boolean,
  ) {
    const s = scores.map((v, i) => v + bias[i]!);
    const per = s.length / groups;
    const groupScore = Array.from({ length: groups }, (_, g) => {
      const m = s.slice(g * per, (g + 1) * per).sort((a, b) => b - a);
      return sumTop2 ? m[0]! + m[1]! : m[0]!;
    });
    const keep = new Set(argTop(groupScore, topkGroup));
    const masked = s.map((v, i) => (keep.has(Math.floor(i / per)) ? v : Number.NEGATIVE_INFINITY));
    return argTop(masked, k)
      .sort((a, b) => a - b)
      .join(",");
  }
  const argTop = (xs: number[], k: number) =>
    xs
      .map((v, i) => [v, i] as const)
      .sort((a, b) => b[0] - a[0] || a[1] - b[1])
      .slice(0, k)
      .map(([, i]) => i);

  async function gateOf(dir: string, layer: number) {
    const ckpt = await Checkpoint.open(dir);
    const w = bf16ArrayToFloat32(
      (await ckpt.read(`model.layers.${layer}.mlp.gate.weight`)).data as Uint16Array,
    );
    const name = `model.layers.${layer}.mlp.gate.e_score_correction_bias`;
    const bias = ckpt.has(name) ? [...((await ckpt.read(name)).data as Float32Array)] : null;
    return { w, bias, experts: ckpt.config.nRoutedExperts };
  }

  function logits(w: Float32Array, experts: number, x: Float32Array): number[] {
    return Array.from({ length: experts }, (_, e) =>
      x.reduce((a, v, c) => a + v * w[e * 64 + c]!, 0),
    );
  }

  it("V3: negative and positive biases change the choice, and so does the group limit", async () => {
    const { w, bias, experts } = await gateOf(await model("v3"), 1);
    expect(bias!.some((b) => b < 0) && bias!.some((b) => b > 0)).toBe(true);
    const zero = new Array(experts).fill(0);
    const rng = new Prng(2, "tokens");
    let biasChanges = 0;
    let groupChanges = 0;
    const tokens = 200;
    for (let t = 0; t < tokens; t++) {
      const scores = logits(w, experts, rng.fillNormal(new Float32Array(64))).map(
        (l) => 1 / (1 + Math.exp(-l)),
      );
      const chosen = route(scores, bias!, 4, 2, 4, true);
      if (chosen !== route(scores, zero, 4, 2, 4, true)) biasChanges++;
      if (chosen !== route(scores, bias!, 1, 1, 4, true)) groupChanges++;
    }
    expect(biasChanges / tokens).toBeGreaterThan(0.25);
    expect(groupChanges / tokens).toBeGreaterThan(0.1);
  });

  it("V2: the group limit changes the choice", async () => {
    const { w, experts } = await gateOf(await model("v2"), 1);
    const zero = new Array(experts).fill(0);
    const rng = new Prng(3, "tokens");
    let groupChanges = 0;
    const tokens = 200;
    for (let t = 0; t < tokens; t++) {
      const l = logits(w, experts, rng.fillNormal(new Float32Array(64)));
      const z = l.reduce((a, v) => a + Math.exp(v), 0);
      const scores = l.map((v) => Math.exp(v) / z);
      if (route(scores, zero, 2, 1, 2, false) !== route(scores, zero, 1, 1, 2, false))
        groupChanges++;
    }
    expect(groupChanges / tokens).toBeGreaterThan(0.1);
  });
});

describe("mini preset", () => {
  it.each(["v2", "v3"] as const)(
    "%s is about 1.1 GB in bf16 with 128-aligned expert shapes",
    (arch) => {
      const c = parseModelConfig(tinyConfigJson(arch, "mini"));
      const bytes = modelWeights(c).reduce((a, w) => a + w.shape.reduce((x, y) => x * y, 1) * 2, 0);
      expect(bytes / 1e9).toBeGreaterThan(1.0);
      expect(bytes / 1e9).toBeLessThan(1.3);
      expect([c.hiddenSize % 128, c.moeIntermediateSize % 128]).toEqual([0, 0]);
    },
  );
});

describe("expertmesh make-tiny-model", () => {
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, [join(repo, "src/cli/main.ts"), "make-tiny-model", ...args], {
      encoding: "utf8",
    });

  it("writes a checkpoint and prints a summary", () => {
    const out = join(root, "cli");
    const r = cli("--arch", "v2", "--out", out, "--seed", "5", "--shards", "2", "--fp8");
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    expect(r.stdout).toContain(`wrote DeepseekV2ForCausalLM (tiny, seed 5, fp8 e4m3) to ${out}`);
    expect(r.stdout).toContain("model-00002-of-00002.safetensors");
    expect(existsSync(join(out, "model.safetensors.index.json"))).toBe(true);
  });

  it("reports usage errors with their code", () => {
    const r = cli("--arch", "v4", "--out", "x");
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("[EM_CLI_USAGE] --arch must be v2 or v3");
  });

  it.each([
    [["--out", "x"], "--arch must be v2 or v3"],
    [["--arch", "v3"], "--out DIR is required"],
    [["--arch", "v3", "--out", "x", "--preset", "huge"], "--preset must be tiny or mini"],
    [["--arch", "v3", "--out", "x", "--seed", "4294967296"], "--seed must be an integer"],
    [["--arch", "v3", "--out", "x", "--shards", "0"], "--shards must be an integer"],
    [["--arch", "v3", "--out", "x", "--bogus"], "Unknown option"],
    [["--arch", "v3", "--out", join(root, "many"), "--shards", "999"], "too many for this model"],
  ])("rejects %j", async (args, message) => {
    const err = await makeTinyModelCommand.run(args).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe("EM_CLI_USAGE");
    expect((err as Error).message).toContain(message);
  });

  it.each([
    ["/proc/expertmesh-x", "ENOENT"],
    ["/dev/null/x", "ENOTDIR"],
    ["a file", "EEXIST"],
  ])("an --out it cannot write (%s) is EM_WRITE_FAILED, and returns", (out, why) => {
    const file = join(root, "a-file");
    writeFileSync(file, "x");
    const r = cli("--arch", "v3", "--out", out === "a file" ? file : out);
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("[EM_WRITE_FAILED] cannot write the tiny model to ");
    expect(r.stderr).toContain(why);
  });
});

describe("makeDirs", () => {
  it("creates missing parents and accepts a folder that exists", () => {
    const dir = join(root, "dirs", "a", "b", "c");
    makeDirs(dir);
    makeDirs(dir);
    expect(statSync(dir).isDirectory()).toBe(true);
  });

  it.each([
    ["/proc/expertmesh-x/y", "ENOENT"],
    ["/dev/null/x/y", "ENOTDIR"],
  ])(
    "throws for %s (%s) where mkdirSync's recursive mode never returns or hides why",
    (dir, code) => {
      expect(() => makeDirs(dir)).toThrow(expect.objectContaining({ code }));
    },
  );

  it("throws EEXIST for a file in the way", () => {
    const file = join(root, "in-the-way");
    writeFileSync(file, "x");
    expect(() => makeDirs(join(file))).toThrow(expect.objectContaining({ code: "EEXIST" }));
    expect(() => makeDirs(join(file, "below"))).toThrow(
      expect.objectContaining({ code: "ENOTDIR" }),
    );
  });
});

describe("tiny-v3 with an MTP layer (--mtp)", () => {
  it("adds num_nextn_predict_layers 1 and the MTP layer's tensors; the main tensors are unchanged", async () => {
    const dir = mkdtempSync(join(tmpdir(), "em-tiny-mtp-"));
    const plainDir = mkdtempSync(join(tmpdir(), "em-tiny-plain-"));
    await writeTinyModel(dir, { arch: "v3", mtp: true });
    await writeTinyModel(plainDir, { arch: "v3" });
    const mtp = await Checkpoint.open(dir, { mtp: true });
    const plain = await Checkpoint.open(plainDir);
    expect(mtp.config.numNextnPredictLayers).toBe(1);
    const extra = mtp.names().filter((n) => !plain.has(n));
    expect(extra.every((n) => n.startsWith("model.layers.4."))).toBe(true);
    for (const n of [
      "embed_tokens.weight",
      "enorm.weight",
      "hnorm.weight",
      "eh_proj.weight",
      "shared_head.norm.weight",
      "shared_head.head.weight",
      "mlp.gate.e_score_correction_bias",
      "mlp.experts.15.down_proj.weight",
      "mlp.shared_experts.up_proj.weight",
    ])
      expect(extra).toContain(`model.layers.4.${n}`);
    expect(mtp.tensorInfo("model.layers.4.eh_proj.weight").shape).toEqual([64, 128]);
    // Seeded by name: the main model's tensors are the same bytes.
    const a = await mtp.read("model.layers.3.mlp.experts.2.up_proj.weight");
    const b = await plain.read("model.layers.3.mlp.experts.2.up_proj.weight");
    expect(Buffer.from(a.data.buffer)).toEqual(Buffer.from(b.data.buffer));
    // Opened without it, the MTP layer's tensors stay hidden, and say why when asked for.
    const skipping = await Checkpoint.open(dir);
    expect(() => skipping.tensorInfo("model.layers.4.enorm.weight")).toThrow(
      /multi-token-prediction layer, which is skipped/,
    );
    expect(tinyModelCurrent(dir, { arch: "v3", mtp: true })).toBe(true);
    expect(tinyModelCurrent(dir, { arch: "v3" })).toBe(false);
  });

  it("is a V3 part: v2 with --mtp is refused", () => {
    expect(() => tinyConfigJson("v2", "tiny", false, true)).toThrow(/DeepSeek-V3 part/);
  });
});
