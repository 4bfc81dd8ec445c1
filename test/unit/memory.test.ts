// The bytes the operator requests for each pod (src/api/memory.ts), computed from the
// manifest and the plan alone, against what the processes really load: the tensors of
// checkpoints written by make-tiny-model (bf16 and fp8, with and without an MTP layer).
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import {
  everyShardExpertBytes,
  GPU_MEMORY_OVERHEAD,
  gatewayWeightBytes,
  gpuMemoryLabel,
  gpuMemoryShortfalls,
  memoryLimitShortfalls,
  shardExpertBytes,
} from "../../src/api/memory.ts";
import { quantityValue } from "../../src/api/quantity.ts";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { denseLoadBytes, expertLoad } from "../../src/cli/progress.ts";
import { upMemory } from "../../src/local/prepare.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";
import { planPlacement } from "../../src/moe/placement.ts";

function manifest(preset: string, dtype: string, mtp: boolean, kvBytes = 512 * 2 ** 20) {
  return parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns }
spec:
  model: { preset: ${preset}, dtype: ${dtype}, source: { pvc: { claimName: w } } }
  experts: { shards: 2, redundantExperts: 2 }
  gateway: { kvCache: { bytes: ${kvBytes} }${mtp ? ", speculative: { method: mtp }" : ""} }
`);
}

describe("pod memory from the manifest", () => {
  it.each([
    { arch: "v2", dtype: "auto", fp8: false, mtp: false },
    { arch: "v3", dtype: "auto", fp8: false, mtp: false },
    // A bf16 checkpoint served in fp8 holds what the fp8 checkpoint of the same model stores.
    { arch: "v3", dtype: "fp8", fp8: true, mtp: false },
    { arch: "v3", dtype: "auto", fp8: false, mtp: true },
    { arch: "v3", dtype: "fp8", fp8: true, mtp: true },
  ] as const)(
    "tiny-$arch in $dtype (mtp $mtp): the gateway's and every shard's bytes are the checkpoint's",
    async ({ arch, dtype, fp8, mtp }) => {
      const dir = mkdtempSync(join(tmpdir(), "em-memory-"));
      await writeTinyModel(dir, { arch, preset: "tiny", seed: 0, fp8, mtp, shards: 1 });
      const ckpt = await Checkpoint.open(dir, { mtp });
      const model = manifest(`tiny-${arch}`, dtype, mtp);
      // The gateway reads every tensor but the routed experts; with MTP it drops the layer's
      // copies of the embeddings and head (the main model's, byte for byte).
      const copies = mtp
        ? ["embed_tokens", "shared_head.head"].reduce(
            (n, t) =>
              n +
              ckpt.tensorInfo(`model.layers.${ckpt.config.numHiddenLayers}.${t}.weight`).byteLength,
            0,
          )
        : 0;
      expect(gatewayWeightBytes(model)).toBe(denseLoadBytes(ckpt, false) - copies);
      const plan = planPlacement({
        architecture: architectureOf(model),
        numShards: 2,
        redundantExperts: 2,
        mtpLayers: mtp ? 1 : 0,
      });
      for (let k = 0; k < 2; k++) {
        const held = new Map(plan.layers.map((l) => [l.layer, new Set(l.shardExperts[k])]));
        const load = expertLoad(ckpt, (layer, e) => held.get(layer)?.has(e) ?? false);
        expect(load.bytes).toBeGreaterThan(0);
        expect(shardExpertBytes(model, plan, k)).toBe(load.bytes);
      }
    },
  );

  it("knows nothing without a preset's figures and a dtype: explicit architecture with dtype auto", () => {
    const m = manifest("tiny-v3", "auto", false);
    const { preset: _, ...rest } = m.spec.model;
    const explicit = {
      ...m,
      spec: { ...m.spec, model: { ...rest, architecture: architectureOf(m) } },
    };
    expect(gatewayWeightBytes(explicit)).toBeNull();
    const plan = planPlacement({ architecture: architectureOf(m), numShards: 2 });
    expect(shardExpertBytes(explicit, plan, 0)).toBeNull();
    // With a dtype the experts are known (their figures are in every architecture); the
    // gateway's attention figures are not.
    const fp8 = {
      ...explicit,
      spec: { ...explicit.spec, model: { ...explicit.spec.model, dtype: "fp8" as const } },
    };
    expect(shardExpertBytes(fp8, plan, 0)).toBeGreaterThan(0);
    expect(gatewayWeightBytes(fp8)).toBeNull();
  });

  it("DeepSeek-V3's gateway holds ~17 GiB in fp8 (its dense part: embeddings and head in bf16)", () => {
    // Published: 671 B parameters, of which 58 x 256 routed experts of 3 x 7168 x 2048 are
    // 654.3 B: ~16.7 B dense, 1.85 B of them each for the embeddings and the head (bf16).
    const bytes = gatewayWeightBytes(manifest("deepseek-v3", "auto", false, 64 * 2 ** 30))!;
    const dense = 671e9 - 58 * 256 * 3 * 7168 * 2048;
    const bf16 = 2 * 129280 * 7168;
    // fp8 linear layers: a byte per weight; the rest (embeddings, head, norms, routers) two.
    expect(bytes / (dense + bf16)).toBeGreaterThan(0.98);
    expect(bytes / (dense + bf16)).toBeLessThan(1.02);
  });
});

describe("quantityValue", () => {
  it.each([
    ["64Gi", 64 * 2 ** 30],
    ["512Mi", 512 * 2 ** 20],
    ["1.5Gi", 1.5 * 2 ** 30],
    ["100Ki", 102400],
    ["2Ti", 2 * 2 ** 40],
    ["500M", 5e8],
    ["1G", 1e9],
    ["3k", 3000],
    ["1500m", 1.5],
    ["1e9", 1e9],
    ["2E3", 2000],
    ["1E", 1e18],
    ["17179869184", 17179869184],
    [4096, 4096],
    [" 8Gi ", 8 * 2 ** 30],
    ["8gi", null],
    ["8GB", null],
    ["Gi", null],
    ["", null],
    ["1.2.3", null],
  ] as const)("%j -> %j", (q, want) => {
    expect(quantityValue(q)).toBe(want);
  });
});

describe("memoryLimitShortfalls", () => {
  const base = manifest("tiny-v3", "auto", false);
  const plan = planPlacement({
    architecture: architectureOf(base),
    numShards: 2,
    redundantExperts: 2,
  });
  const shardBytes = shardExpertBytes(base, plan, 0)!;
  const gatewayBytes = gatewayWeightBytes(base)! + base.spec.gateway.kvCache.bytes;
  const withLimits = (shard?: string | number, gateway?: string | number) => ({
    ...base,
    spec: {
      ...base.spec,
      experts: {
        ...base.spec.experts,
        ...(shard === undefined ? {} : { resources: { limits: { memory: shard } } }),
      },
      gateway: {
        ...base.spec.gateway,
        ...(gateway === undefined ? {} : { resources: { limits: { memory: gateway } } }),
      },
    },
  });
  it.each([
    { name: "no limits", shard: undefined, gateway: undefined, want: [] },
    { name: "limits with room", shard: "1Gi", gateway: "2Gi", want: [] },
    { name: "exactly the bytes", shard: shardBytes, gateway: gatewayBytes, want: [] },
    {
      name: "an unparseable limit is the API server's to refuse",
      shard: "lots",
      gateway: undefined,
      want: [],
    },
    {
      name: "a shard limit a byte short",
      shard: shardBytes - 1,
      gateway: undefined,
      want: ["spec.experts.resources.limits.memory"],
    },
    {
      name: "a gateway limit below its KV cache",
      shard: undefined,
      gateway: "256Mi",
      want: ["spec.gateway.resources.limits.memory"],
    },
    {
      name: "both",
      shard: "100Ki",
      gateway: "256Mi",
      want: ["spec.experts.resources.limits.memory", "spec.gateway.resources.limits.memory"],
    },
  ])("$name", ({ shard, gateway, want }) => {
    const got = memoryLimitShortfalls(withLimits(shard, gateway), plan);
    expect(got.map((m) => m.split(" ")[0])).toEqual(want);
  });
  it("names the limit, the shard and the bytes", () => {
    expect(memoryLimitShortfalls(withLimits("100Ki", "256Mi"), plan)).toEqual([
      `spec.experts.resources.limits.memory 100Ki is less than shard 0's experts alone (${(shardBytes / 1024).toFixed(1)} KiB in bf16): a shard holds its experts in host memory; raise the limit above that, plus room (expertmesh plan -f prints what each pod holds)`,
      "spec.gateway.resources.limits.memory 256Mi is less than the gateway's weights (295.8 KiB) and KV cache (512.0 MiB, spec.gateway.kvCache.bytes): raise the limit above their sum, plus room",
    ]);
  });
});

describe("expertmesh up's memory line", () => {
  const m = manifest("tiny-v3", "auto", false);
  const plan = planPlacement({
    architecture: architectureOf(m),
    numShards: 2,
    redundantExperts: 2,
  });
  // 2 shards x 9 experts per layer x 3 MoE layers x 12 KiB; the gateway 295.8 KiB + 512 MiB.
  const shards = 2 * shardExpertBytes(m, plan, 0)!;
  const gateway = gatewayWeightBytes(m)! + m.spec.gateway.kvCache.bytes;

  it("says what the processes will hold against the machine's memory", () => {
    expect(shards).toBe(2 * 9 * 3 * 12288);
    expect(upMemory(m, plan, 24 * 2 ** 30)).toBe(
      "memory: the processes will hold ~512.9 MiB (shards 648.0 KiB, gateway 512.3 MiB with its KV cache); this machine has 24.00 GiB",
    );
  });

  it("with several gateways: each holds its weights and KV cache", () => {
    const two = { ...m, spec: { ...m.spec, gateway: { ...m.spec.gateway, replicas: 2 } } };
    expect(upMemory(two, plan, 24 * 2 ** 30)).toBe(
      "memory: the processes will hold ~1.00 GiB (shards 648.0 KiB, 2 gateways 512.3 MiB each with its KV cache); this machine has 24.00 GiB",
    );
  });

  it("with --single-process: the gateway holds every expert once (a plan of one shard, no copies)", () => {
    const one = planPlacement({
      architecture: architectureOf(m),
      numShards: 1,
      redundantExperts: 0,
    });
    // 16 experts per layer x 3 MoE layers x 12 KiB: the 2 copies of hot experts per layer gone
    expect(upMemory(m, one, 24 * 2 ** 30, true)).toBe(
      "memory: the gateway will hold ~512.9 MiB (experts 576.0 KiB, the rest 512.3 MiB with its KV cache); this machine has 24.00 GiB",
    );
  });

  it("warns when that is over 90 % of it", () => {
    expect(upMemory(m, plan, Math.ceil((shards + gateway) / 0.9) + 1)).not.toMatch(/too little/);
    expect(upMemory(m, plan, Math.floor((shards + gateway) / 0.9) - 1)).toMatch(
      /: too little, expect one to be killed while loading \(a smaller spec\.gateway\.kvCache\.bytes, or spec\.model\.dtype fp8, holds less\)$/,
    );
  });
});

describe("gpuMemoryShortfalls (the operator's Warning Event GPUMemoryShort)", () => {
  // DeepSeek-V3 in fp8: ~609 GiB of routed experts; on 8 shards ~76 GiB each, which an
  // H200 holds (GPU feature discovery's nvidia.com/gpu.memory: 143771 MiB) and, just, an 80
  // GB H100 (81559); on 4 shards ~152 GiB each, which neither holds.
  const MiB = 2 ** 20;
  const H100 = 81559 * MiB;
  const H200 = 143771 * MiB;
  const LARGER = 192 * 2 ** 30;
  const v3 = (
    experts: Record<string, unknown>,
    gateway: Record<string, unknown> = {},
    dtype = "fp8",
  ) =>
    parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: v3, namespace: ns }
spec:
  model: { preset: deepseek-v3, dtype: ${dtype}, source: { pvc: { claimName: w } } }
  experts: ${JSON.stringify({ shards: 8, gpusPerShard: 1, ...experts })}
  gateway: ${JSON.stringify({ gpus: 1, kvCache: { bytes: 16 * 2 ** 30, dtype: "bfloat16" }, ...gateway })}
`);
  const planOf = (m: DeepSeekModel) =>
    planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
      redundantExperts: m.spec.experts.redundantExperts,
    });
  const nodes = (...bytes: number[]) => bytes.map((b, i) => ({ node: `gpu-${i}`, bytes: b }));
  const base = v3({});
  const four = v3({ shards: 4 });
  const shardNeed = Math.max(...everyShardExpertBytes(base, planOf(base))!) + GPU_MEMORY_OVERHEAD;
  const gatewayNeed = gatewayWeightBytes(base)! + 16 * 2 ** 30 + GPU_MEMORY_OVERHEAD;

  it.each([
    { name: "H200s hold 8 shards and the gateway", m: base, e: [H200, H200], g: [H200], want: [] },
    { name: "80 GB H100s too, just", m: base, e: [H100], g: [H100], want: [] },
    { name: "no labelled node: nothing known", m: four, e: [], g: [], want: [] },
    { name: "H200s are too small for 4 shards", m: four, e: [H200], g: [H200], want: ["shard"] },
    { name: "a GPU of exactly a shard's need", m: base, e: [shardNeed], g: [H200], want: [] },
    { name: "a byte less", m: base, e: [shardNeed - 1], g: [H200], want: ["shard"] },
    {
      name: "one small node among large ones",
      m: four,
      e: [LARGER, H200, LARGER],
      g: [H200],
      want: ["shard"],
    },
    {
      name: "CPU shards keep nothing on a GPU",
      m: v3({ shards: 4, gpusPerShard: 0 }),
      e: [H100],
      g: [H200],
      want: [],
    },
    { name: "a gateway of exactly its need", m: base, e: [H200], g: [gatewayNeed], want: [] },
    { name: "a gateway a byte short", m: base, e: [H200], g: [gatewayNeed - 1], want: ["gateway"] },
    {
      name: "a CPU gateway keeps nothing on a GPU",
      m: v3({}, { gpus: 0 }),
      e: [H200],
      g: [1],
      want: [],
    },
    { name: "both", m: four, e: [H200], g: [gatewayNeed - 1], want: ["shard", "gateway"] },
  ])("$name", ({ m, e, g, want }) => {
    const got = gpuMemoryShortfalls(m, planOf(m), { experts: nodes(...e), gateway: nodes(...g) });
    expect(got.map((s) => s.split(" ")[s.startsWith("a ") ? 1 : 0])).toEqual(want);
  });

  it("names the shard, its bytes, the nodes and how many shards would fit", () => {
    const [shard] = gpuMemoryShortfalls(four, planOf(four), {
      experts: nodes(H200, H200),
      gateway: [],
    });
    expect(shard).toBe(
      "shard 0 keeps 152.29 GiB of experts (fp8) on its GPU, plus ~2.00 GiB for CUDA: more than one nvidia.com/gpu holds on every node that offers it (140.40 GiB at most, nvidia.com/gpu.memory; 2 node(s)); the experts that do not fit are copied to the GPU for every batch, at PCIe's speed: about 5 shards (spec.experts.shards, now 4) would fit them",
    );
  });

  it("some nodes large enough: names the small ones and the way to the others", () => {
    const m = v3({ shards: 4, gpuResource: "nvidia.com/mig-7g.141gb" });
    const [shard] = gpuMemoryShortfalls(m, planOf(m), {
      experts: nodes(LARGER, H200, H200, H200, H200),
      gateway: [],
    });
    expect(shard).toMatch(
      /: more than one nvidia\.com\/mig-7g\.141gb holds on 4 of the 5 nodes that offer it \(gpu-1, gpu-2, gpu-3 and 1 more; nvidia\.com\/mig-7g\.141gb\.memory\); .*: or keep the shards on the nodes with larger GPUs \(spec\.scheduling\.nodeSelector or affinity\)$/,
    );
  });

  it("bf16 experts: fp8 would halve them", () => {
    const m = v3({}, {}, "bf16");
    const [shard] = gpuMemoryShortfalls(m, planOf(m), { experts: nodes(H200), gateway: [] });
    expect(shard).toMatch(
      /^shard 0 keeps 152\.\d\d GiB of experts \(bf16\) .*: about 9 shards \(spec\.experts\.shards, now 8\) would fit them; fp8 \(spec\.model\.dtype\) halves them$/,
    );
  });

  it("a gateway: what KV cache fits beside its weights, or that the weights alone do not", () => {
    const [kv] = gpuMemoryShortfalls(base, planOf(base), {
      experts: [],
      gateway: nodes(gatewayNeed - 2 ** 30),
    });
    expect(kv).toMatch(
      /^a gateway keeps 17\.77 GiB of weights and its KV cache's device copy \(16\.00 GiB, spec\.gateway\.kvCache\.bytes\) on its GPU, plus ~2\.00 GiB for CUDA: .*; what does not fit stays in host memory and crosses PCIe every step: a KV cache of 15\.00 GiB or less fits beside the weights$/,
    );
    const bf16 = v3({}, { gpuResource: "nvidia.com/mig-1g.18gb" }, "bf16");
    const [weights] = gpuMemoryShortfalls(bf16, planOf(bf16), {
      experts: [],
      gateway: nodes(18 * 2 ** 30),
    });
    expect(weights).toMatch(
      /^a gateway keeps 31\.88 GiB of weights .*nvidia\.com\/mig-1g\.18gb\.memory.*: the weights alone do not fit: fp8 \(spec\.model\.dtype\) halves them$/,
    );
  });

  it.each([
    ["nvidia.com/gpu", "nvidia.com/gpu.memory"],
    ["nvidia.com/mig-3g.71gb", "nvidia.com/mig-3g.71gb.memory"],
    ["nvidia.com/gpu.shared", "nvidia.com/gpu.shared.memory"],
    [`example.com/${"g".repeat(57)}`, null], // the label's name part would be 64 characters
    [`example.com/${"g".repeat(56)}`, `example.com/${"g".repeat(56)}.memory`],
  ])("the memory label of %s is %s", (resource, label) => {
    expect(gpuMemoryLabel(resource)).toBe(label);
  });
});
