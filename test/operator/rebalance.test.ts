// End to end in local mode with the real control plane: the operator (a process under the
// chart's ServiceAccount) watches a DeepSeekModel whose gateway and shards run here as real
// processes on the test nats-server, under real load from concurrent `openai` clients.
// The load reports they publish make the operator scale the shard Deployments up, and the
// skewed expert load makes it rebalance the placement live, shards first, with no failed
// request.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { AppsV1Api, CoreV1Api, CustomObjectsApi } from "@kubernetes/client-node";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parsePlan } from "../../src/moe/plan-json.ts";
import type { ManagedProcess } from "../env/process.ts";
import { kubectl } from "../support/cli.ts";
import { adminKubeConfig, testEnv, uniqueName, waitFor } from "../support/env.ts";
import { type GatewayProcess, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import {
  getModel,
  model,
  operatorForNamespaces,
  type RunningOperator,
} from "../support/operator.ts";
import { startShard, waitServing } from "../support/shards.ts";

const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const apps = kc.makeApiClient(AppsV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

/** Routed tokens one shard computed per MoE layer, from one of its own load reports. */
interface ShardSample {
  at: number;
  shard: number;
  /** layer -> tokens */
  tokens: Map<string, number>;
  planVersion: number;
}

const totalTokens = (samples: ShardSample[]) =>
  samples.reduce((n, s) => n + [...s.tokens.values()].reduce((a, b) => a + b, 0), 0);

/**
 * What a decode step waits for, as the planner computes it (planStepImbalance): per MoE
 * layer the busiest shard's tokens, summed over layers, over the same sum of the mean.
 */
function stepImbalance(samples: ShardSample[], numShards: number): number {
  const perLayer = new Map<string, number[]>();
  for (const s of samples)
    for (const [layer, n] of s.tokens) {
      if (!perLayer.has(layer)) perLayer.set(layer, new Array<number>(numShards).fill(0));
      perLayer.get(layer)![s.shard]! += n;
    }
  let busiest = 0;
  let mean = 0;
  for (const loads of perLayer.values()) {
    busiest += Math.max(...loads);
    mean += loads.reduce((a, b) => a + b, 0) / numShards;
  }
  return busiest / mean;
}

describe.sequential("local mode under real load: autoscaling and live expert rebalancing", () => {
  const releaseNs = uniqueName("em-rb");
  const ns = uniqueName("rb");
  const name = "rb";
  let op: RunningOperator;
  let nc: NatsConnection;
  const shards: ManagedProcess[] = [];
  let gateway: GatewayProcess;
  let late: GatewayProcess | undefined;
  let planPath = "";
  let modelDir = "";
  const samples: ShardSample[] = [];
  // The workload: 8 clients asking the same thing over and over (a skewed expert load).
  let running = true;
  const outcomes = { ok: 0, failed: [] as string[] };
  let clients: Promise<void>[] = [];

  beforeAll(async () => {
    op = await operatorForNamespaces({
      release: "expertmesh-rb",
      releaseNs,
      identity: "op-rb",
      namespaces: [ns],
    });
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model(name, ns, {
        gateway: { gpus: 0 },
        experts: {
          shards: 2,
          redundantExperts: 2,
          gpusPerShard: 0,
          replicas: { min: 1, max: 3 },
          rebalance: {
            enabled: true,
            threshold: 1.01,
            minImprovement: 0.01,
            windowSeconds: 60,
            minTokens: 1500,
            cooldownSeconds: 3600,
          },
        },
        nats: { url: testEnv().nats.url },
        autoscaling: {
          enabled: true,
          intervalSeconds: 1,
          metricWindowSeconds: 3,
          shardTargetQueueDepth: 0.5,
          gatewayTargetQueueDepth: 100,
        },
      }),
    });
    // The processes start on the plan the operator wrote, as pods would mount it.
    const cm = await waitFor("the plan ConfigMap", async () =>
      core.readNamespacedConfigMap({ name: `${name}-plan`, namespace: ns }).catch(() => undefined),
    );
    planPath = join(testEnv().runDir, `${ns}.plan.json`);
    writeFileSync(planPath, cm.data!["plan.json"]!);
    expect(parsePlan(cm.data!["plan.json"]!).version).toBe(1);
    modelDir = await tinyCheckpointFor("tiny-v2");
    for (let k = 0; k < 2; k++)
      shards.push(startShard(modelDir, planPath, name, k, `p${k}`, testEnv().nats.url, ns));
    await Promise.all(shards.map((s) => waitServing(s)));
    gateway = await startGatewayProcess({ modelDir, planPath, namespace: ns, modelName: name });

    nc = await connect({ servers: testEnv().nats.url });
    nc.subscribe(`em.${ns}.${name}.stats.shard.>`, {
      callback: (err, msg) => {
        if (err) return;
        const r = msg.json<{
          shard: number;
          planVersion: number;
          expertTokens: Record<string, Record<string, number>>;
        }>();
        const tokens = new Map<string, number>();
        for (const [layer, byExpert] of Object.entries(r.expertTokens))
          tokens.set(
            layer,
            Object.values(byExpert).reduce((a, b) => a + b, 0),
          );
        samples.push({ at: Date.now(), shard: r.shard, tokens, planVersion: r.planVersion });
      },
    });
    clients = Array.from({ length: 8 }, async () => {
      while (running) {
        try {
          const r = await gateway.client.chat.completions.create({
            model: "tiny",
            messages: [{ role: "user", content: "tell me about the sea" }],
            max_tokens: 24,
            temperature: 0,
          });
          if (r.choices[0]?.message.content === undefined) throw new Error("no content");
          outcomes.ok++;
        } catch (err) {
          outcomes.failed.push(String(err));
        }
      }
    });
  });

  afterAll(async () => {
    running = false;
    await Promise.all(clients);
    await nc?.close();
    await gateway?.process.stop(3000);
    await late?.process.stop(3000);
    for (const s of shards) await s.stop(3000);
    await op?.process.stop();
    await core.deleteNamespace({ name: ns }).catch(() => {});
  });

  it("real load from concurrent requests scales the shard Deployments up within the window", async () => {
    await waitFor(
      "a shard Deployment scaled up",
      async () => {
        const ds = await apps.listNamespacedDeployment({
          namespace: ns,
          labelSelector: `expertmesh.io/model=${name},app.kubernetes.io/component=shard`,
        });
        return ds.items.some((d) => (d.spec?.replicas ?? 0) > 1) ? true : undefined;
      },
      60_000,
    );
    const m = await waitFor("the decision in status", async () => {
      const m = await getModel(ns, name);
      return m.status?.autoscaling?.decisions.some((d) => d.role.startsWith("shard-"))
        ? m
        : undefined;
    });
    const d = m.status!.autoscaling!.decisions.find((d) => d.role.startsWith("shard-"))!;
    expect(d.to).toBeGreaterThan(d.from);
    expect(d.queueDepth).toBeGreaterThan(0.5);
    expect(outcomes.failed).toEqual([]);
  });

  it("a skewed expert load is rebalanced live: max/mean per-shard load improves, no request fails", async () => {
    const shapeBefore = (
      await apps.readNamespacedDeployment({ name: `${name}-shard-0`, namespace: ns })
    ).spec?.template.metadata?.annotations?.["expertmesh.io/plan-shape"];
    const m = await waitFor(
      "a finished rebalance",
      async () => {
        const m = await getModel(ns, name);
        return m.status?.rebalance?.lastTime ? m : undefined;
      },
      120_000,
    );
    const doneAt = Date.now();
    expect(m.status!.planVersion).toBe(2);
    expect(m.status!.rebalance!.lastAfter!).toBeLessThan(m.status!.rebalance!.lastBefore!);
    // Same load after the switch, measured from the shards' own reports.
    await new Promise((r) => setTimeout(r, 8_000));
    running = false;
    await Promise.all(clients);

    const before = samples.filter((s) => s.planVersion === 1);
    const after = samples.filter((s) => s.planVersion === 2 && s.at > doneAt + 1000);
    expect(totalTokens(before)).toBeGreaterThan(1000);
    expect(totalTokens(after)).toBeGreaterThan(200);
    const imbalanceBefore = stepImbalance(before, 2);
    const imbalanceAfter = stepImbalance(after, 2);
    console.log(
      `per-shard routed tokens, max/mean per layer summed over layers: before ${imbalanceBefore.toFixed(3)} (plan v1), after ${imbalanceAfter.toFixed(3)} (plan v2); planner expected ${m.status!.rebalance!.lastBefore} -> ${m.status!.rebalance!.lastAfter}; ${outcomes.ok} requests`,
    );
    expect(imbalanceAfter).toBeLessThan(imbalanceBefore);
    expect(outcomes.failed).toEqual([]);
    expect(outcomes.ok).toBeGreaterThan(10);

    // The ConfigMap names v2 (new pods start on it); no pod restarted for it.
    const cm = await core.readNamespacedConfigMap({ name: `${name}-plan`, namespace: ns });
    expect(parsePlan(cm.data!["plan.json"]!).version).toBe(2);
    const shapeAfter = (
      await apps.readNamespacedDeployment({ name: `${name}-shard-0`, namespace: ns })
    ).spec?.template.metadata?.annotations?.["expertmesh.io/plan-shape"];
    expect(shapeAfter).toBe(shapeBefore);
    expect(gateway.log()).toContain("routing with plan v2");
    for (const s of shards) expect(readFileSync(s.logPath, "utf8")).toContain("plan v2 active");
    const described = await kubectl(["describe", "dsm", name, "-n", ns]);
    expect(described.stdout).toContain("RebalanceStarted");
    expect(described.stdout).toContain("Rebalanced");
  });

  it("a gateway that starts from the old plan (a stale mount) is told to switch, then serves", async () => {
    late = await startGatewayProcess({
      modelDir,
      planPath, // still plan v1
      namespace: ns,
      modelName: name,
    });
    await late.process.waitUntil(
      "switched to plan v2",
      async () => late!.log().includes("routing with plan v2"),
      30_000,
    );
    const r = await late.client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "tell me about the sea" }],
      max_tokens: 8,
      temperature: 0,
    });
    expect(r.usage?.completion_tokens).toBeGreaterThan(0);
  });
});
