// The operator's autoscaler against the real control plane and the real nats-server: the
// test publishes load reports on em.<ns>.<model>.stats.> exactly as gateways and shards do,
// and watches the operator (a process under the chart's ServiceAccount) scale Deployments.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { CoreV1Api, CustomObjectsApi } from "@kubernetes/client-node";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { kubectl } from "../support/cli.ts";
import { adminKubeConfig, testEnv, uniqueName, waitFor } from "../support/env.ts";
import {
  getModel,
  model,
  operatorForNamespaces,
  ownedDeployments,
  type RunningOperator,
} from "../support/operator.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));
const kc = adminKubeConfig();
const core = kc.makeApiClient(CoreV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };

/** Publishes a load report per (subject) every 250 ms, like the real processes (1 s). */
class Reporters {
  readonly #reports = new Map<string, () => Record<string, unknown>>();
  readonly #timer: NodeJS.Timeout;
  readonly prefix: string;
  constructor(nc: NatsConnection, prefix: string) {
    this.prefix = prefix;
    this.#timer = setInterval(() => {
      for (const [subject, body] of this.#reports)
        nc.publish(subject, JSON.stringify({ ...body(), timestamp: Date.now() }));
    }, 250);
  }
  shard(k: number, id: string, pending: number): void {
    this.#reports.set(`${this.prefix}.shard.${k}.${id}`, () => ({
      role: "shard",
      shard: k,
      id,
      planVersion: 1,
      plans: [1],
      pendingTokens: pending,
      meanPendingTokens: pending,
    }));
  }
  gateway(id: string, waiting: () => number): void {
    this.#reports.set(`${this.prefix}.gateway.${id}`, () => ({
      role: "gateway",
      id,
      waiting: waiting(),
    }));
  }
  silence(filter: (subject: string) => boolean): void {
    for (const s of [...this.#reports.keys()]) if (filter(s)) this.#reports.delete(s);
  }
  stop(): void {
    clearInterval(this.#timer);
  }
}

describe.sequential("operator autoscaling by queue depth (real NATS + control plane)", () => {
  const releaseNs = uniqueName("em-as");
  const ns = uniqueName("as");
  const name = "as";
  let op: RunningOperator;
  let nc: NatsConnection;
  let reporters: Reporters;

  const replicas = async (deployment: string) =>
    (await ownedDeployments(ns, name)).find((d) => d.metadata?.name === deployment)?.spec?.replicas;
  const waitReplicas = (deployment: string, n: number, timeoutMs = 30_000) =>
    waitFor(
      `${deployment} at ${n} replicas`,
      async () => ((await replicas(deployment)) === n ? true : undefined),
      timeoutMs,
    );

  beforeAll(async () => {
    op = await operatorForNamespaces({
      release: "expertmesh-as",
      releaseNs,
      identity: "op-as",
      namespaces: [ns],
    });
    nc = await connect({ servers: testEnv().nats.url });
    reporters = new Reporters(nc, `em.${ns}.${name}.stats`);
    await custom.createNamespacedCustomObject({
      ...G,
      namespace: ns,
      body: model(name, ns, {
        gateway: { gpus: 0, minReplicas: 1, maxReplicas: 3 },
        experts: { shards: 2, gpusPerShard: 0, replicas: { min: 1, max: 3 } },
        nats: { url: testEnv().nats.url },
        autoscaling: {
          enabled: true,
          intervalSeconds: 1,
          metricWindowSeconds: 2,
          staleAfterSeconds: 3,
          scaleUpStabilizationSeconds: 0,
          scaleDownStabilizationSeconds: 8,
          policyPeriodSeconds: 1,
          shardTargetQueueDepth: 10,
          gatewayTargetQueueDepth: 4,
        },
      }),
    });
    await waitReplicas(`${name}-shard-1`, 1);
  });

  afterAll(async () => {
    reporters?.stop();
    await nc?.close();
    await op?.process.stop();
    await core.deleteNamespace({ name: ns }).catch(() => {});
  });

  it("load above target scales each shard up within the window, capped at max; explained in status, Events, metrics", async () => {
    reporters.gateway("g0", () => 0);
    reporters.shard(0, "r0", 50); // 5x the target: wants 5, max is 3
    reporters.shard(1, "r0", 50);
    await waitReplicas(`${name}-shard-0`, 3);
    await waitReplicas(`${name}-shard-1`, 3);
    const m = await waitFor("decisions in status", async () => {
      const m = await getModel(ns, name);
      return (m.status?.autoscaling?.decisions.length ?? 0) >= 2 ? m : undefined;
    });
    const d0 = m.status!.autoscaling!.decisions.find((d) => d.role === "shard-0")!;
    expect(d0).toMatchObject({ from: 1, to: 3, target: 10, reason: "AtMaximum" });
    expect(d0.queueDepth).toBeGreaterThan(10);
    const gwRole = m.status!.autoscaling!.roles.find((r) => r.role === "gateway")!;
    expect(gwRole).toMatchObject({ metric: "Known", desiredReplicas: 1, reporters: 1 });
    expect(m.status!.autoscaling!.mode).toBe("operator");

    const described = await kubectl(["describe", "dsm", name, "-n", ns]);
    expect(described.code, described.stderr).toBe(0);
    expect(described.stdout).toContain("ScaledUp");
    expect(described.stdout).toMatch(/shard-0: 1 -> 3 replicas/);
    expect(described.stdout).toMatch(/Decisions:/);

    const series = (metric: string, role: string) =>
      `${metric}{namespace="${ns}",model="${name}",role="${role}"}`;
    expect(await op.metric(series("expertmesh_queue_depth", "shard-0"))).toBeGreaterThan(10);
    expect(await op.metric(series("expertmesh_autoscaler_desired_replicas", "shard-0"))).toBe(3);
    expect(await op.metric(series("expertmesh_autoscaler_target_queue_depth", "gateway"))).toBe(4);
  });

  it("below target scales down only after the stabilization window, never below min; stale reports never scale down", async () => {
    const drop = Date.now();
    reporters.silence(() => true);
    reporters.gateway("g0", () => 0);
    for (const id of ["r0", "r1", "r2"]) reporters.shard(0, id, 0);
    // shard-1 goes silent: its queue depth becomes unknown.
    await waitReplicas(`${name}-shard-0`, 1, 40_000);
    const m = await waitFor("the scale-down decision in status", async () => {
      const m = await getModel(ns, name);
      return m.status?.autoscaling?.decisions.some((d) => d.role === "shard-0" && d.to === 1)
        ? m
        : undefined;
    });
    const down = m.status!.autoscaling!.decisions.filter(
      (d) => d.role === "shard-0" && d.to < d.from,
    );
    // The first scale-down came no earlier than the 8 s window after the last high
    // recommendation, which was the last decision before the drop: at most one 1 s interval
    // earlier. Times in status have 1 s resolution (truncated). Without the window the
    // scale-down would come within about 2 s (the 2 s metric window).
    expect(Date.parse(down[0]!.time) - drop).toBeGreaterThanOrEqual(8_000 - 1_000 - 1_000);
    expect(Math.min(...down.map((d) => d.to))).toBe(1);
    // By now shard-1 has been silent for longer than the scale-down window too: still 3.
    expect(await replicas(`${name}-shard-1`)).toBe(3);
    const role1 = m.status!.autoscaling!.roles.find((r) => r.role === "shard-1")!;
    expect(role1.metric).toBe("Unknown");
    expect(role1.message).toMatch(/unknown/);
    expect(
      m.status!.autoscaling!.decisions.filter((d) => d.role === "shard-1" && d.to < d.from),
    ).toEqual([]);
  });

  it("oscillating gateway load does not flap", async () => {
    const before = (await getModel(ns, name)).status!.autoscaling!.decisions.length;
    let high = false;
    reporters.gateway("g0", () => (high ? 20 : 0));
    const flip = setInterval(() => {
      high = !high;
    }, 1000);
    try {
      // 14 s of alternating 20 / 0 waiting requests (target 4).
      await new Promise((r) => setTimeout(r, 14_000));
    } finally {
      clearInterval(flip);
    }
    const decisions = (await getModel(ns, name))
      .status!.autoscaling!.decisions.slice(before)
      .filter((d) => d.role === "gateway");
    // Flapping is a scale-down between scale-ups: the scale-down window holds the highest
    // recent recommendation, so the replicas only climb (at most 1 -> 2 -> 3 while the
    // metric window fills) and stay.
    expect(decisions.filter((d) => d.to < d.from)).toEqual([]);
    expect(decisions.length).toBeLessThanOrEqual(2);
  });

  it("external mode leaves replicas to an HPA; the documented HPA manifest is valid for this API server", async () => {
    const patch = await kubectl([
      "patch",
      "dsm",
      name,
      "-n",
      ns,
      "--type=merge",
      "-p",
      JSON.stringify({ spec: { autoscaling: { mode: "external" } } }),
    ]);
    expect(patch.code, patch.stderr).toBe(0);
    await waitFor("status in external mode", async () =>
      (await getModel(ns, name)).status?.autoscaling?.mode === "external" ? true : undefined,
    );
    const scale = await kubectl(["scale", "deploy", `${name}-shard-0`, "-n", ns, "--replicas=2"]);
    expect(scale.code, scale.stderr).toBe(0);
    // A spec edit makes the operator reconcile (and apply) again; it must not touch replicas.
    await kubectl([
      "patch",
      "dsm",
      name,
      "-n",
      ns,
      "--type=merge",
      "-p",
      JSON.stringify({ spec: { autoscaling: { tolerance: 0.2 } } }),
    ]);
    await waitFor("reconciled", async () => {
      const m = await getModel(ns, name);
      return m.status?.observedGeneration === m.metadata.generation ? m : undefined;
    });
    expect(await replicas(`${name}-shard-0`)).toBe(2);
    expect(
      await op.metric(`expertmesh_queue_depth{namespace="${ns}",model="${name}",role="shard-0"}`),
    ).toBe(0);
    // docs/autoscaling.md's HPA: accepted by the real API server (server-side dry run).
    const hpa = readFileSync(`${root}examples/autoscaling/hpa.yaml`, "utf8")
      .replaceAll("namespace: default", `namespace: ${ns}`)
      .replaceAll("tiny-", `${name}-`)
      .replaceAll('model: "tiny"', `model: "${name}"`);
    const dry = await kubectl(["apply", "--dry-run=server", "-f", "-"], hpa);
    expect(dry.code, dry.stderr).toBe(0);
    expect(dry.stdout).toMatch(
      /horizontalpodautoscaler.autoscaling\/.* created \(server dry run\)/,
    );
  });
});
