// A shard's side of a live plan change (ADR 0003) on the test nats-server, with real expert
// weights and the native kernels: `prepare` adds a plan while the old one keeps serving,
// `activate` switches and retires the old plan after the grace period, bad plans are
// refused and reported, and readiness probes do not count as load.
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { LocalExperts } from "../../src/engine/experts.ts";
import {
  heldExperts,
  loadExperts,
  loadWeights,
  type ModelWeights,
} from "../../src/engine/loader.ts";
import { probeShards } from "../../src/gateway/server.ts";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { modelArchitectureOf } from "../../src/model/config.ts";
import { RemoteExperts } from "../../src/moe/dispatcher.ts";
import { type PlacementPlan, planPlacement } from "../../src/moe/placement.ts";
import { encodePlanControl } from "../../src/moe/plan-control.ts";
import { ShardServer } from "../../src/moe/shard-server.ts";
import { subjects } from "../../src/moe/subjects.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { native } from "../support/shards.ts";

describe("live plan switch on a shard (real NATS, real weights)", () => {
  const ref = { namespace: "test", model: "plan-switch" };
  const ncs: NatsConnection[] = [];
  const servers: ShardServer[] = [];
  let weights: ModelWeights;
  let v1: PlacementPlan;
  let v2: PlacementPlan;
  let gw: NatsConnection;
  let arch: ReturnType<typeof modelArchitectureOf>;

  beforeAll(async () => {
    const ckpt = await Checkpoint.open(await tinyCheckpointFor("tiny-v2"));
    arch = modelArchitectureOf(ckpt.config);
    weights = await loadWeights(ckpt, "all");
    v1 = planPlacement({ architecture: arch, numShards: 2, redundantExperts: 2 });
    // Another placement of the same shape: hot experts 6 and 7 get the copies.
    const load = v1.moeLayers.map(() => [1, 1, 1, 1, 1, 1, 20, 30]);
    v2 = planPlacement({
      architecture: arch,
      numShards: 2,
      redundantExperts: 2,
      expertLoad: load,
      version: 2,
    });
    expect(v2.layers[0]!.shardExperts).not.toEqual(v1.layers[0]!.shardExperts);
    for (let k = 0; k < 2; k++) {
      const nc = await connect({ servers: testEnv().nats.url });
      ncs.push(nc);
      const holds = new Map(v1.layers.map((l) => [l.layer, new Set(l.shardExperts[k])]));
      const server = new ShardServer({
        nc,
        model: ref,
        shard: k,
        id: `s${k}`,
        plan: v1,
        backend: native,
        experts: await loadExperts(ckpt, (l, e) => holds.get(l)?.has(e) ?? false),
        loadExperts: (wanted) => loadExperts(ckpt, wanted),
        retireAfterMs: 300,
      });
      server.start(60_000);
      servers.push(server);
      await nc.flush();
    }
    gw = await connect({ servers: testEnv().nats.url });
    ncs.push(gw);
  });

  afterAll(async () => {
    for (const s of servers) await s.drain();
    for (const nc of ncs) await nc.close();
  });

  /** One MoE layer through the shards with `plan`, against all experts in process. */
  async function roundTrip(plan: PlacementPlan): Promise<number> {
    const remote = new RemoteExperts({
      nc: gw,
      model: ref,
      plan,
      dispatchDtype: "f32",
      combineDtype: "f32",
      deadlineMs: 3000,
    });
    const dim = weights.config.hiddenSize;
    const t = 5;
    const x = Float32Array.from({ length: t * dim }, (_, i) => Math.sin(i * 0.37));
    // Every expert, the hot ones (with copies in one of the plans) included.
    const ids = Int32Array.from([0, 6, 1, 7, 2, 6, 3, 7, 4, 5]);
    const w = Float32Array.from({ length: ids.length }, (_, i) => 0.25 + (i % 3) * 0.25);
    const layer = plan.moeLayers[0]!;
    const got = await remote.run(layer, x, t, dim, ids, w, 2);
    const local = new LocalExperts(native, heldExperts(weights));
    const want = await local.run(layer, x, t, dim, ids, w, 2);
    let scale = 0;
    let worst = 0;
    for (let i = 0; i < want.length; i++) {
      scale = Math.max(scale, Math.abs(want[i]!));
      worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
    }
    return worst / scale;
  }

  const publish = (op: "prepare" | "activate", plan: PlacementPlan) =>
    gw.publish(subjects.planControl(ref), encodePlanControl(op, plan));

  it("readiness probes are answered but not counted as expert load", async () => {
    for (const s of servers) s.takeLoad();
    expect(await probeShards(gw, ref, v1, weights.config.hiddenSize, 2000)).toEqual({
      ready: true,
      failed: {},
    });
    for (const s of servers) {
      const load = s.takeLoad();
      expect(load.frames).toBe(1);
      expect(load.expertTokens).toEqual({});
    }
    expect(await roundTrip(v1)).toBeLessThan(1e-5);
    const counted = servers.map((s) => s.takeLoad().expertTokens);
    expect(counted.some((c) => Object.keys(c).length > 0)).toBe(true);
  });

  it("a probe that fails says why, per shard: a plan the shards lack, or no shard at all", async () => {
    const v9 = { ...v1, version: 9 };
    const lacking = await probeShards(gw, ref, v9, weights.config.hiddenSize, 2000);
    expect(lacking.ready).toBe(false);
    expect(Object.keys(lacking.failed)).toEqual(["0", "1"]);
    for (const why of Object.values(lacking.failed))
      expect(why).toMatch(
        /^\[EM_WIRE_PLAN_VERSION\] frame routed with plan v9; this shard has plan v1/,
      );
    const nobody = { namespace: ref.namespace, model: `${ref.model}-none` };
    const absent = await probeShards(gw, nobody, v1, weights.config.hiddenSize, 2000);
    expect(absent).toEqual({
      ready: false,
      failed: {
        "0": `no replica serves ${subjects.shard(nobody, 0)} (no responders)`,
        "1": `no replica serves ${subjects.shard(nobody, 1)} (no responders)`,
      },
    });
    for (const s of servers) s.takeLoad();
  });

  it("prepare serves both plans; activate switches and retires the old one after the grace", async () => {
    publish("prepare", v2);
    await waitFor("both shards prepared v2", async () =>
      servers.every((s) => s.planVersions.join() === "1,2") ? true : undefined,
    );
    expect(servers.map((s) => s.takeLoad().planVersion)).toEqual([1, 1]);
    expect(await roundTrip(v1)).toBeLessThan(1e-5);
    expect(await roundTrip(v2)).toBeLessThan(1e-5);

    publish("activate", v2);
    await waitFor("v1 retired", async () =>
      servers.every((s) => s.planVersions.join() === "2") ? true : undefined,
    );
    const load = servers[0]!.takeLoad();
    expect([load.planVersion, load.plans]).toEqual([2, [2]]);
    expect(await roundTrip(v2)).toBeLessThan(1e-5);
    await expect(roundTrip(v1)).rejects.toMatchObject({ code: "EM_WIRE_PLAN_VERSION" });
    // Only the experts v2 gives each shard are left in memory.
    for (const [k, s] of servers.entries())
      expect(s.activePlan.layers[0]!.shardExperts[k]).toEqual(v2.layers[0]!.shardExperts[k]);
  });

  it("refuses plans it cannot switch to live, says so in its load report, and keeps serving", async () => {
    const fourShards = planPlacement({ architecture: arch, numShards: 4, version: 3 });
    publish("prepare", fourShards);
    await waitFor("planError for another shape", async () =>
      /cannot replace/.test(servers[0]!.takeLoad().planError ?? "") ? true : undefined,
    );
    // The active version with other contents (e.g. an operator that re-planned v2).
    publish("prepare", { ...v1, version: 2 });
    await waitFor("planError for other contents", async () =>
      /active here with other contents/.test(servers[1]!.takeLoad().planError ?? "")
        ? true
        : undefined,
    );
    expect(servers.map((s) => s.planVersions.join())).toEqual(["2", "2"]);
    expect(await roundTrip(v2)).toBeLessThan(1e-5);
  });
});
