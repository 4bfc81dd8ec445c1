// Every example manifest is valid (schema, defaults, CEL-equivalent rules) and plans.
import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { planPlacement } from "../../src/moe/placement.ts";

const dir = new URL("../../examples/", import.meta.url);
const manifests = readdirSync(dir).filter(
  (f) =>
    f.endsWith(".yaml") && readFileSync(new URL(f, dir), "utf8").includes("kind: DeepSeekModel"),
);

describe("examples/", () => {
  it("has the tiny and the DeepSeek-V3 manifests", () => {
    expect(manifests).toEqual(expect.arrayContaining(["tiny.yaml", "deepseek-v3.yaml"]));
  });
  it.each(manifests)("%s is valid and plans", (file) => {
    const m = parseManifest(readFileSync(new URL(file, dir), "utf8"), file);
    const plan = planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
      redundantExperts: m.spec.experts.redundantExperts,
    });
    expect(plan.layers.length).toBeGreaterThan(0);
    for (const layer of plan.layers)
      for (const shardExperts of layer.shardExperts)
        expect(shardExperts.length).toBe(plan.slotsPerShard);
  });
});
