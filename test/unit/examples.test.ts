// Every example manifest is valid (schema, defaults, CEL-equivalent rules) and plans.
import { readdirSync, readFileSync } from "node:fs";
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { parseAllDocuments } from "yaml";
import { architectureOf, parseManifest } from "../../src/api/manifest.ts";
import { shardExpertBytes } from "../../src/api/memory.ts";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import { parseKvCacheDtype } from "../../src/engine/kv-format.ts";
import type { ModelConfig } from "../../src/model/config.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { Autoscaler } from "../../src/operator/autoscale/autoscaler.ts";
import { names } from "../../src/operator/labels.ts";
import { promqlSelectors, promqlSyntaxErrors } from "../support/promql.ts";

const dir = new URL("../../examples/", import.meta.url);
const manifests = readdirSync(dir).filter(
  (f) =>
    f.endsWith(".yaml") && readFileSync(new URL(f, dir), "utf8").includes("kind: DeepSeekModel"),
);

describe("examples/", () => {
  it("has the tiny and the DeepSeek-V3 manifests", () => {
    expect(manifests).toEqual(expect.arrayContaining(["tiny.yaml", "deepseek-v3.yaml"]));
  });
  it("deepseek-v3.yaml's KV cache holds its maxModelLen (else the gateway refuses to start)", () => {
    const m = parseManifest(readFileSync(new URL("deepseek-v3.yaml", dir), "utf8"), "v3");
    const { bytes, dtype, blockSize } = m.spec.gateway.kvCache;
    // V3's MLA: kv_lora_rank 512 + rope 64 per token in each of 61 layers.
    const v3 = { kvLoraRank: 512, qkRopeHeadDim: 64, numHiddenLayers: 61 } as ModelConfig;
    const tokens =
      Math.floor(bytes / bytesPerBlock(v3, blockSize, parseKvCacheDtype(dtype))) * blockSize;
    expect(tokens).toBeGreaterThanOrEqual(m.spec.gateway.limits.maxModelLen!);
  });
  it("deepseek-v2-fp8.yaml: fp8 halves what a shard holds, to fit one 80 GB GPU with room", () => {
    const m = parseManifest(readFileSync(new URL("deepseek-v2-fp8.yaml", dir), "utf8"), "v2");
    const plan = planPlacement({
      architecture: architectureOf(m),
      numShards: m.spec.experts.shards,
      redundantExperts: m.spec.experts.redundantExperts,
    });
    const bf16 = { ...m, spec: { ...m.spec, model: { ...m.spec.model, dtype: "auto" as const } } };
    const fp8Bytes = shardExpertBytes(m, plan, 0)!;
    expect(fp8Bytes / shardExpertBytes(bf16, plan, 0)!).toBeCloseTo(0.5, 3);
    expect(fp8Bytes).toBeLessThan(0.4 * 80e9);
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

// examples/autoscaling: the HPA and KEDA manifests of docs/autoscaling.md (external mode) for
// examples/tiny.yaml. Their API validity is checked against a real API server (and KEDA's
// CRD) in test/operator/autoscale.test.ts; here, that they fit the model and the operator.
describe("examples/autoscaling", () => {
  const tiny = parseManifest(readFileSync(new URL("tiny.yaml", dir), "utf8"), "tiny.yaml");
  const { name: model, namespace } = tiny.metadata;
  const a = tiny.spec.autoscaling;
  // The metrics the operator registers, with their label names.
  const registry = new Registry();
  new Autoscaler({ registry, requeue: () => {}, event: () => {}, log: () => {} });
  const exported = new Map(
    registry
      .getMetricsAsArray()
      .map((m) => [m.name, (m as unknown as { labelNames: string[] }).labelNames] as const),
  );
  const deploymentOf = (role: string) =>
    role === "gateway" ? names.gateway(model) : names.shard(model, Number(role.slice(6)));

  interface Use {
    object: string;
    target: string;
    metric: string;
    labels: Record<string, string>;
    perReplica: number;
  }
  const uses = (file: string): Use[] => {
    const objects = parseAllDocuments(
      readFileSync(new URL(`autoscaling/${file}`, dir), "utf8"),
    ).map((d) => d.toJS());
    return objects.flatMap((o) => {
      expect(o.metadata.namespace, o.metadata.name).toBe(namespace);
      if (o.kind === "HorizontalPodAutoscaler") {
        expect(o.apiVersion).toBe("autoscaling/v2");
        expect(o.spec.scaleTargetRef).toMatchObject({ apiVersion: "apps/v1", kind: "Deployment" });
        return o.spec.metrics.map(
          (m: {
            type: string;
            external: {
              metric: { name: string; selector: { matchLabels: Record<string, string> } };
              target: { type: string; averageValue: string };
            };
          }) => {
            expect(m.type).toBe("External");
            // AverageValue: the HPA divides the total by the replicas, as the operator does.
            expect(m.external.target.type).toBe("AverageValue");
            return {
              object: o.metadata.name,
              target: o.spec.scaleTargetRef.name,
              metric: m.external.metric.name,
              labels: m.external.metric.selector.matchLabels,
              perReplica: Number(m.external.target.averageValue),
            };
          },
        );
      }
      expect(`${o.apiVersion} ${o.kind}`).toBe("keda.sh/v1alpha1 ScaledObject");
      return o.spec.triggers.flatMap(
        (t: { type: string; metadata: { query: string; threshold: string } }) => {
          expect(t.type).toBe("prometheus");
          // Trigger metadata are strings in KEDA's CRD.
          expect(typeof t.metadata.threshold).toBe("string");
          expect(promqlSyntaxErrors(t.metadata.query), t.metadata.query).toEqual([]);
          return promqlSelectors(t.metadata.query).map((s) => ({
            object: o.metadata.name,
            target: o.spec.scaleTargetRef.name,
            metric: s.name,
            labels: s.labels,
            perReplica: Number(t.metadata.threshold),
          }));
        },
      );
    });
  };

  it.each(["hpa.yaml", "keda.yaml"])(
    "%s: gateway and shard-0 of tiny.yaml, each on its own role's series of a metric the operator exports, at the default target",
    (file) => {
      const all = uses(file);
      expect(all.map((u) => u.labels.role).sort()).toEqual(["gateway", "shard-0"]);
      for (const u of all) {
        expect(exported.has(u.metric), `${u.object}: ${u.metric} is exported`).toBe(true);
        expect(exported.get(u.metric)).toEqual(expect.arrayContaining(Object.keys(u.labels)));
        expect(u.labels).toEqual({ namespace, model, role: u.labels.role });
        // The Deployment it scales is the one of the role whose series it reads.
        expect(u.target).toBe(deploymentOf(u.labels.role!));
        expect(u.object).toBe(u.target);
        expect(u.perReplica).toBe(
          u.labels.role === "gateway" ? a.gatewayTargetQueueDepth : a.shardTargetQueueDepth,
        );
      }
    },
  );

  it("the PromQL reader used above reads what it should", () => {
    expect(promqlSelectors('sum(m_total{namespace="n",role="shard-1"}) / on() x{a="b"}')).toEqual([
      { name: "m_total", labels: { namespace: "n", role: "shard-1" } },
      { name: "x", labels: { a: "b" } },
    ]);
    expect(() => promqlSelectors('m{role=~"shard-.*"}')).toThrow(/only = matchers/);
  });
});
