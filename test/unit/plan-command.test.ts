import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { formatRanges, planOutput } from "../../src/cli/commands/plan.ts";
import { parsePlan } from "../../src/moe/plan-json.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const tinyYaml = join(root, "examples/tiny.yaml");

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

describe("expertmesh plan", () => {
  it("summarizes examples/tiny.yaml", () => {
    const out = planOutput(["-f", tinyYaml]);
    expect(out).toContain("model:            tiny-v3 (default/tiny, preset tiny-v3)");
    expect(out).toContain("MoE layers:       1-3 (3 of 4 layers; 16 routed experts, top-4)");
    expect(out).toContain("slots per shard:  4 (16 routed + 0 redundant experts)");
    expect(out).toMatch(/shard 0: 0-3\n {2}shard 1: 4-7\n {2}shard 2: 8-11\n {2}shard 3: 12-15\n/);
    expect(out).toContain("replicated experts in layer 1: none");
    expect(out).toContain("1.000 in layer 1, worst 1.000");
    // What each pod holds (src/api/memory.ts): 12 experts of 3 x 64 x 32 bf16 weights.
    expect(out).toContain(
      "memory per pod (linear layers in bf16):\n  shard:   144.0 KiB of experts\n  gateway: 295.8 KiB of weights + 512.0 MiB of KV cache\n",
    );
  });

  it("says what DeepSeek-V3's pods hold, beside the manifest's own requests", () => {
    const out = planOutput(["-f", join(root, "examples/deepseek-v3.yaml")]);
    expect(out).toContain("memory per pod (linear layers in fp8):");
    expect(out).toContain("  shard:   21.42 GiB of experts (the manifest requests 64Gi)");
    expect(out).toContain(
      "  gateway: 17.77 GiB of weights + 48.00 GiB of KV cache (the manifest requests 128Gi)",
    );
  });

  it("says what each process keeps on its GPU, and with --gpu-memory whether one GPU holds it", () => {
    const v3 = join(root, "examples/deepseek-v3.yaml");
    expect(planOutput(["-f", v3])).toContain(
      "on its GPU (with ~2.00 GiB for CUDA; --gpu-memory checks a size):\n  shard:   23.42 GiB\n  gateway: 67.77 GiB (weights, the KV cache's device copy)\n",
    );
    // 32 shards fit an 80 GB H100 (GPU feature discovery's 81559 MiB), 4 do not.
    expect(planOutput(["-f", v3, "--gpu-memory", "81559Mi"])).toMatch(
      /against one GPU of 79\.65 GiB \(--gpu-memory 81559Mi\):\n {2}shard: {3}23\.42 GiB\n {2}gateway: 67\.77 GiB .*\n {2}every process fits\n$/,
    );
    const four = planOutput(["-f", v3, "--shards", "4", "--gpu-memory", "81559Mi"]);
    expect(four).toContain(
      "  too much: shard 0 keeps 171.32 GiB of experts (fp8) on its GPU, plus ~2.00 GiB for CUDA: more than one GPU of 79.65 GiB (--gpu-memory 81559Mi) holds; the experts that do not fit are copied to the GPU for every batch, at PCIe's speed: about 9 shards (spec.experts.shards, now 4) would fit them\n",
    );
    expect(four).not.toContain("a gateway keeps");
    // Roles without GPUs keep nothing there.
    const cpu = join(root, "examples/tiny-scaling.yaml");
    expect(planOutput(["-f", cpu])).not.toContain("on its GPU");
    expect(planOutput(["-f", cpu, "--gpu-memory", "1Gi"])).toContain(
      "no role of this manifest runs on a GPU: --gpu-memory checks nothing",
    );
    expect(codeOf(() => planOutput(["-f", v3, "--gpu-memory", "lots"]))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => planOutput(["-f", v3, "--gpu-memory", "-1Gi"]))).toBe("EM_CLI_USAGE");
    expect(
      codeOf(() =>
        planOutput(["--preset", "deepseek-v3", "--shards", "8", "--gpu-memory", "80Gi"]),
      ),
    ).toBe("EM_CLI_USAGE");
  });

  it("places the MTP layer's experts with --mtp (and for a manifest asking for MTP drafts)", () => {
    const out = planOutput(["--preset", "deepseek-v3", "--shards", "32", "--mtp"]);
    expect(out).toContain(
      "MoE layers:       3-61 (58 of 61 layers, and MTP layer 61; 256 routed experts, top-8)",
    );
    const plain = planOutput(["--preset", "deepseek-v3", "--shards", "32"]);
    expect(plain).toContain("MoE layers:       3-60 (58 of 61 layers; 256 routed experts, top-8)");
    const dir = mkdtempSync(join(tmpdir(), "em-plan-"));
    const file = join(dir, "tiny-mtp.yaml");
    writeFileSync(
      file,
      readFileSync(tinyYaml, "utf8").replace(
        "  gateway:\n",
        "  gateway:\n    speculative: { method: mtp }\n",
      ),
    );
    expect(parsePlan(planOutput(["-f", file, "--json"])).moeLayers).toEqual([1, 2, 3, 4]);
  });

  it("prints the serialized plan with --json, flags overriding the manifest", () => {
    const plan = parsePlan(
      planOutput(["-f", tinyYaml, "--redundant", "4", "--plan-version", "3", "--json"]),
    );
    expect(plan).toMatchObject({ version: 3, numShards: 4, redundantExperts: 4, slotsPerShard: 5 });
    expect(plan.layers[0]!.replicas.slice(0, 4).map((r) => r.length)).toEqual([2, 2, 2, 2]);
  });

  it("plans explicit figures with a load file", () => {
    const dir = mkdtempSync(join(tmpdir(), "em-plan-"));
    const loadFile = join(dir, "load.json");
    writeFileSync(loadFile, JSON.stringify([80, 1, 1, 1, 1, 1, 1, 1]));
    const args = ["--experts", "8", "--layers", "3", "--dense-layers", "1", "--top-k", "2"];
    const out = planOutput([...args, "--shards", "4", "--redundant", "4", "--load", loadFile]);
    expect(out).toContain("model:            explicit architecture");
    expect(out).toContain("replicated experts in layer 1: 0 x4 (shards 0, 1, 2, 3)");
    expect(out).toContain(`load from ${loadFile}`);
    writeFileSync(loadFile, "{");
    expect(codeOf(() => planOutput([...args, "--shards", "4", "--load", loadFile]))).toBe(
      "EM_PLAN_LOAD_INVALID",
    );
    writeFileSync(loadFile, "[1, 2]");
    expect(codeOf(() => planOutput([...args, "--shards", "4", "--load", loadFile]))).toBe(
      "EM_PLAN_LOAD_INVALID",
    );
  });

  it.each([
    ["no model", ["--shards", "4"], "EM_CLI_USAGE"],
    ["two models", ["--preset", "tiny-v3", "--experts", "8", "--shards", "4"], "EM_CLI_USAGE"],
    [
      "missing explicit figure",
      ["--experts", "8", "--layers", "3", "--shards", "2"],
      "EM_CLI_USAGE",
    ],
    ["no shards", ["--preset", "tiny-v3"], "EM_CLI_USAGE"],
    ["non-integer shards", ["--preset", "tiny-v3", "--shards", "4.5"], "EM_CLI_USAGE"],
    ["unknown option", ["--preset", "tiny-v3", "--shards", "4", "--nope"], "EM_CLI_USAGE"],
    ["unknown preset", ["--preset", "huge", "--shards", "4"], "EM_ARCH_UNKNOWN_PRESET"],
    ["too many shards", ["--preset", "tiny-v3", "--shards", "17"], "EM_PLAN_INVALID"],
    ["missing manifest", ["-f", "/nonexistent/m.yaml"], "EM_MANIFEST_READ"],
  ])("rejects %s", (_name, argv, code) => {
    expect(codeOf(() => planOutput(argv))).toBe(code);
  });

  it("runs as a subprocess and exits non-zero with the code", () => {
    const main = join(root, "src/cli/main.ts");
    const ok = spawnSync(process.execPath, [main, "plan", "-f", tinyYaml], { encoding: "utf8" });
    expect(ok.status).toBe(0);
    expect(ok.stdout).toContain("shard 3: 12-15");
    const bad = spawnSync(process.execPath, [main, "plan", "-f", tinyYaml, "--shards", "32"], {
      encoding: "utf8",
    });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(
      /^expertmesh plan: \[EM_PLAN_INVALID\] 32 shards for 16 routed experts/,
    );
  });

  it.each([
    [[], ""],
    [[5], "5"],
    [[0, 1, 2, 3, 7, 9, 10], "0-3, 7, 9-10"],
  ])("formatRanges(%j) = %j", (ids, text) => {
    expect(formatRanges(ids)).toBe(text);
  });
});
