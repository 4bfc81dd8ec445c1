// Failures of the data plane, with real shard processes and a real nats-server: a replica
// killed mid-generation, no replica left, nats-server restarted, malformed frames.
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { connect } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generate } from "../../src/engine/generate.ts";
import { SequenceCache } from "../../src/engine/model.ts";
import { PREVIOUS_WEIGHTS_ENV, subjects } from "../../src/moe/subjects.ts";
import { decodeFrame, encodeDispatch, encodeError } from "../../src/moe/wire.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { startNats } from "../env/nats.ts";
import { testEnv, waitFor } from "../support/env.ts";
import { readGolden, tinyCheckpointFor } from "../support/golden.ts";
import {
  type Cluster,
  distributedModel,
  localModel,
  metricsPort,
  startShard,
  startShards,
  stopAll,
  waitServing,
} from "../support/shards.ts";

const golden = readGolden("tiny-v3");
const prompt = golden.prompts[0]!.token_ids;

describe("a shard replica dies mid-generation", () => {
  let cluster: Cluster | undefined;
  afterAll(async () => stopAll(cluster));

  it("completes with identical output through the other replica; with none left, fails clearly within the deadline", async () => {
    const dir = await tinyCheckpointFor("tiny-v3");
    cluster = await startShards(dir, 2, { replicas: 2 });
    const remote = await distributedModel(cluster, { deadlineMs: 3000, attemptTimeoutMs: 500 });
    try {
      const [shard0a, shard0b] = cluster.shards.filter((s) => s.name.includes("-0-"));
      let killed = false;
      const got = await generate(remote.model, prompt, { maxTokens: 32 }, (_id) => {
        if (!killed && remote.experts.retries === 0) {
          shard0a!.child.kill("SIGKILL");
          killed = true;
        }
      });
      expect(killed).toBe(true);
      expect(got.tokens).toEqual(golden.greedy.tokens);

      shard0b!.child.kill("SIGKILL");
      await waitFor(
        "both replicas of shard 0 gone",
        async () => (shard0a!.exited && shard0b!.exited) || undefined,
      );
      const t0 = Date.now();
      const err = await remote.model
        .forward(prompt, new SequenceCache(remote.weights.config))
        .catch((e: unknown) => e);
      const elapsed = Date.now() - t0;
      expect(err).toBeInstanceOf(ExpertMeshError);
      expect((err as ExpertMeshError).code).toBe("EM_DISPATCH_UNAVAILABLE");
      expect((err as Error).message).toMatch(
        /no replica of shard 0 .* answered layer \d+ within the 3000 ms deadline/,
      );
      expect(elapsed).toBeLessThan(6000);
    } finally {
      await remote.nc.close();
    }
  });
});

describe("nats-server restarts mid-generation", () => {
  let cluster: Cluster | undefined;
  let nats: Awaited<ReturnType<typeof startNats>> | undefined;
  afterAll(async () => {
    await stopAll(cluster);
    await nats?.process.stop();
  });

  it("reconnects shards and gateway; later requests succeed with the same output", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "nats-restart-"));
    nats = await startNats(testEnv().binaries.natsServer, dir, join(testEnv().runDir, "logs"));
    const port = nats.info.port;
    cluster = await startShards(await tinyCheckpointFor("tiny-v3"), 2, { natsUrl: nats.info.url });
    const remote = await distributedModel(cluster, {
      natsUrl: nats.info.url,
      deadlineMs: 15_000,
      attemptTimeoutMs: 1000,
    });
    try {
      const local = await localModel(cluster.modelDir);
      const want = await generate(local.model, prompt, { maxTokens: 16 });
      let restarted = false;
      const got = await generate(remote.model, prompt, { maxTokens: 16 }, async () => {
        if (restarted) return;
        restarted = true;
        await nats!.process.stop();
        nats = await startNats(testEnv().binaries.natsServer, dir, join(testEnv().runDir, "logs"), {
          port,
        });
      });
      expect(restarted).toBe(true);
      expect(got.tokens).toEqual(want.tokens);
      // And a fresh generation after the restart.
      expect((await generate(remote.model, prompt, { maxTokens: 8 })).tokens).toEqual(
        want.tokens.slice(0, 8),
      );
      for (const s of cluster.shards) expect(s.exited).toBe(false);
    } finally {
      await remote.nc.close();
    }
  });
});

describe("nats-server gone for a while", () => {
  let cluster: Cluster | undefined;
  let nats: Awaited<ReturnType<typeof startNats>> | undefined;
  afterAll(async () => {
    await stopAll(cluster);
    await nats?.process.stop();
  });

  it("a shard says it is not ready (/readyz 503) 10 s after its server went, and ready again once reconnected", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "nats-gone-"));
    const logs = join(testEnv().runDir, "logs");
    nats = await startNats(testEnv().binaries.natsServer, dir, logs);
    const port = nats.info.port;
    cluster = await startShards(await tinyCheckpointFor("tiny-v3"), 1, { natsUrl: nats.info.url });
    const readyz = async () => {
      const res = await fetch(`http://127.0.0.1:${metricsPort(cluster!.shards[0]!)}/readyz`);
      return { status: res.status, text: (await res.text()).trim() };
    };
    expect(await readyz()).toEqual({ status: 200, text: "ok" });
    await nats.process.stop();
    const lostAt = Date.now();
    // A blip is no outage: still ready right after the server went.
    expect((await readyz()).status).toBe(200);
    const notReady = await waitFor(
      "/readyz 503",
      async () => {
        const r = await readyz();
        return r.status === 503 ? r : undefined;
      },
      30_000,
    );
    expect(Date.now() - lostAt).toBeGreaterThanOrEqual(10_000);
    expect(notReady.text).toMatch(/^NATS server lost \d+ s ago, reconnecting$/);
    nats = await startNats(testEnv().binaries.natsServer, dir, logs, { port });
    await waitFor(
      "/readyz 200 again",
      async () => ((await readyz()).status === 200 ? true : undefined),
      30_000,
    );
    expect(cluster.shards[0]!.exited).toBe(false);
  });
});

describe("malformed frames sent straight to a shard", () => {
  let cluster: Cluster | undefined;
  beforeAll(async () => {
    cluster = await startShards(await tinyCheckpointFor("tiny-v3"), 2);
  });
  afterAll(async () => stopAll(cluster));

  it("get error replies with stable codes, and the shard keeps serving", async () => {
    const c = cluster!;
    const nc = await connect({ servers: testEnv().nats.url });
    const subject = subjects.shard(c.ref, 0);
    const ask = async (frame: Uint8Array) =>
      decodeFrame((await nc.request(subject, frame, { timeout: 5000 })).data);
    const held = c.plan.layers[0]!.shardExperts[0]!;
    const notHeld = c.plan.layers[0]!.shardExperts[1]![0]!;
    const layer = c.plan.layers[0]!.layer;
    const valid = (over: Partial<Parameters<typeof encodeDispatch>[0]> = {}) =>
      encodeDispatch({
        dtype: "bf16",
        planVersion: c.plan.version,
        layer,
        hidden: 64,
        numTokens: 1,
        tokenOffset: 0,
        totalTokens: 1,
        activations: new Float32Array(64).fill(0.5),
        token: Uint32Array.of(0),
        expert: Uint32Array.of(held[0]!),
        weight: Float32Array.of(1),
        ...over,
      });
    const flipped = valid();
    flipped[60]! ^= 0xff;
    const cases: [string, Uint8Array, string][] = [
      ["junk", new TextEncoder().encode("hello shard"), "EM_WIRE_TRUNCATED"],
      ["bad magic", new Uint8Array(64).fill(7), "EM_WIRE_MAGIC"],
      ["truncated", valid().subarray(0, 100), "EM_WIRE_TRUNCATED"],
      ["corrupted body", flipped, "EM_WIRE_CRC"],
      ["an error frame", encodeError("X", "y"), "EM_WIRE_KIND"],
      ["another plan version", valid({ planVersion: c.plan.version + 1 }), "EM_WIRE_PLAN_VERSION"],
      ["an expert it does not hold", valid({ expert: Uint32Array.of(notHeld) }), "EM_WIRE_RANGE"],
      ["a dense layer", valid({ layer: 0 }), "EM_WIRE_RANGE"],
      [
        "the wrong width",
        encodeDispatch({
          dtype: "bf16",
          planVersion: c.plan.version,
          layer,
          hidden: 32,
          numTokens: 1,
          tokenOffset: 0,
          totalTokens: 1,
          activations: new Float32Array(32),
          token: Uint32Array.of(0),
          expert: Uint32Array.of(held[0]!),
          weight: Float32Array.of(1),
        }),
        "EM_WIRE_RANGE",
      ],
    ];
    for (const [what, frame, code] of cases) {
      const reply = await ask(frame);
      expect(reply.kind, what).toBe("error");
      expect(reply.kind === "error" && reply.code, what).toBe(code);
    }
    const ok = await ask(valid());
    expect(ok.kind).toBe("combine");
    expect(ok.kind === "combine" && ok.sums.some((v) => v !== 0)).toBe(true);
    for (const s of c.shards) expect(s.exited).toBe(false);

    // Its load report and metrics count what it did.
    const stats = nc.subscribe(
      subjects.stats({ namespace: "test", model: c.modelName }, "shard", "0.r0"),
      { max: 1 },
    );
    for await (const m of stats) {
      const load = m.json() as { role: string; shard: number; pendingFrames: number };
      expect(load).toMatchObject({ role: "shard", shard: 0, pendingFrames: 0 });
    }
    const port = metricsPort(c.shards[0]!);
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    expect(metrics).toMatch(/expertmesh_shard_errors_total\{shard="0"\} 9/);
    expect(metrics).toMatch(/expertmesh_shard_frames_total\{shard="0"\} 1/);
    expect((await fetch(`http://127.0.0.1:${port}/readyz`)).status).toBe(200);
    await nc.close();
  });

  it("a shard started in a blue/green copy's pod (EM_SHARD_PREVIOUS_WEIGHTS=1) says so in its load reports; the others do not", async () => {
    const c = cluster!;
    const copy = startShard(c.modelDir, c.planPath, c.modelName, 0, "copy", undefined, "test", {
      env: { ...process.env, [PREVIOUS_WEIGHTS_ENV]: "1" },
    });
    const nc = await connect({ servers: testEnv().nats.url });
    try {
      await waitServing(copy);
      const report = async (id: string) => {
        const sub = nc.subscribe(
          subjects.stats({ namespace: "test", model: c.modelName }, "shard", id),
          { max: 1 },
        );
        for await (const m of sub) return m.json() as Record<string, unknown>;
        throw new Error(`no report from ${id}`);
      };
      expect(await report("0.copy")).toMatchObject({
        role: "shard",
        shard: 0,
        previousWeights: true,
      });
      expect(await report("0.r0")).not.toHaveProperty("previousWeights");
    } finally {
      await nc.close();
      await copy.stop(3000);
    }
  });

  it("drains on SIGTERM: exits 0 after finishing accepted work", async () => {
    const s = cluster!.shards[1]!;
    s.child.kill("SIGTERM");
    await waitFor("exit", async () => s.exited || undefined, 10_000);
    expect(s.child.exitCode).toBe(0);
  });
});
