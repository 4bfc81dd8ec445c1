// The data plane's buffer reuse against a real nats-server: the gateway's pooled dispatch
// frames and results (handed back with release()), a shard's pooled activations and its pooled large reply frames (given back after
// a flush) must never let one request's bytes leak into another's. Layers large enough for
// every pool (replies over 256 KiB), run one after another and two at a time, with inputs
// that differ per layer; every sum is checked against the same experts computed here (on
// the activations as the wire rounds them, for bf16 and fp8 dispatch).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Backend, MoeArgs } from "../../src/engine/backend.ts";
import type { MlpWeights } from "../../src/engine/loader.ts";
import { RemoteExperts } from "../../src/moe/dispatcher.ts";
import { planPlacement } from "../../src/moe/placement.ts";
import { ShardServer } from "../../src/moe/shard-server.ts";
import { subjects } from "../../src/moe/subjects.ts";
import {
  decodeFrame,
  decodeReply,
  encodeDispatch,
  FLAG_COMBINE_F32,
  type WireDtypeName,
} from "../../src/moe/wire.ts";
import { startNats } from "../env/nats.ts";
import { binaries } from "../env/paths.ts";

const hidden = 2048;
const experts = 16;
const topK = 4;
const numShards = 2;

/** Grouped FFN calls made by the shards (coalescing turns several frames into one call). */
let moeCalls = 0;

/** Expert e multiplies its input by e + 1 (gate.scale): exact enough to check every sum. */
const scaling = {
  name: "scaling",
  moe(a: MoeArgs) {
    moeCalls++;
    // Into the caller's array when given (the Backend contract; the shard's is pooled).
    const out = a.out?.fill(0) ?? new Float32Array(a.numOut * a.dim);
    for (let g = 0; g + 1 < a.offsets.length; g++) {
      const s = (a.w1[g] as unknown as { scale: number }).scale;
      for (let r = a.offsets[g]!; r < a.offsets[g + 1]!; r++) {
        const src = a.xIndex![r]! * a.dim;
        const dst = a.outIndex[r]! * a.dim;
        const w = a.rowWeight[r]! * s;
        for (let j = 0; j < a.dim; j++) out[dst + j]! += w * a.x[src + j]!;
      }
    }
    return out;
  },
} as unknown as Backend;

describe("data plane buffer reuse over NATS", () => {
  const dir = mkdtempSync(join(tmpdir(), "em-data-plane-"));
  let nats: Awaited<ReturnType<typeof startNats>>;
  const ncs: NatsConnection[] = [];
  const plan = planPlacement({
    architecture: {
      numLayers: 3,
      firstDenseLayers: 1,
      routedExperts: experts,
      expertsPerToken: topK,
    },
    numShards,
  });
  const model = { namespace: "test", model: "pools" };
  const servers: ShardServer[] = [];

  beforeAll(async () => {
    // NATS's default max_payload (1 MiB), as a deployment without tuning has it.
    nats = await startNats(binaries().natsServer, dir, dir, { maxPayload: 1024 * 1024 });
    for (let k = 0; k < numShards; k++) {
      const nc = await connect({ servers: nats.info.url });
      ncs.push(nc);
      const held = new Map(
        plan.layers.map((l) => [
          l.layer,
          new Map(
            l.shardExperts[k]!.map((e) => [
              e,
              { gate: { cols: hidden, scale: e + 1 } } as unknown as MlpWeights,
            ]),
          ),
        ]),
      );
      const server = new ShardServer({
        nc,
        model,
        shard: k,
        id: "t",
        plan,
        backend: scaling,
        experts: held,
      });
      server.start(60_000);
      servers.push(server);
      await nc.flush();
    }
  });

  afterAll(async () => {
    for (const nc of ncs) await nc.close();
    await nats?.process.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** x as the shards see it: rounded to the dispatch dtype by the wire (f32 is exact). */
  const throughWire = (x: Float32Array, t: number, dtype: WireDtypeName): Float32Array => {
    if (dtype === "f32") return x;
    const none = { token: new Uint32Array(0), expert: new Uint32Array(0) };
    const frame = decodeFrame(
      encodeDispatch({
        ...{ dtype, planVersion: plan.version, layer: 1, hidden, tokenOffset: 0 },
        ...{ totalTokens: t, numTokens: t, activations: x, weight: new Float32Array(0), ...none },
      }),
    );
    if (frame.kind !== "dispatch") throw new Error(frame.kind);
    return frame.activations;
  };

  /** A gateway's dispatcher, a layer's inputs with their expected sums, and a checker. */
  const gateway = async (dispatchDtype: WireDtypeName = "f32") => {
    const gw = await connect({ servers: nats.info.url });
    ncs.push(gw);
    const remote = new RemoteExperts({
      nc: gw,
      model,
      plan,
      dispatchDtype,
      combineDtype: "f32",
    });
    const layer = (seed: number, t: number) => {
      const x = Float32Array.from({ length: t * hidden }, (_, i) => Math.sin(i * 0.01 + seed));
      const xs = throughWire(x, t, dispatchDtype);
      const ids = Int32Array.from({ length: t * topK }, (_, i) => (i * 7 + seed) % experts);
      // Distinct experts per token: topK consecutive slots of a stride-7 walk over 16.
      const weights = Float32Array.from(
        { length: t * topK },
        (_, i) => 0.1 + ((i + seed) % 5) / 10,
      );
      const want = new Float32Array(t * hidden);
      for (let tok = 0; tok < t; tok++)
        for (let k = 0; k < topK; k++) {
          const w = weights[tok * topK + k]! * (ids[tok * topK + k]! + 1);
          for (let j = 0; j < hidden; j++) want[tok * hidden + j]! += w * xs[tok * hidden + j]!;
        }
      return { x, ids, weights, want, t };
    };
    const check = async (l: ReturnType<typeof layer>, moeLayer: number) => {
      const got = await remote.run(moeLayer, l.x, l.t, hidden, l.ids, l.weights, topK);
      let worst = 0;
      for (let i = 0; i < got.length; i++)
        worst = Math.max(worst, Math.abs(got[i]! - l.want[i]!) / (1 + Math.abs(l.want[i]!)));
      expect(worst).toBeLessThan(1e-5);
      // As the engine does once it has added them: the next layers reuse this memory.
      remote.release(got);
    };
    return { layer, check };
  };
  const moeLayers = plan.layers.map((l) => l.layer);

  it("returns each layer's own sums, one at a time and two in flight", async () => {
    const { layer, check } = await gateway();
    // 64 tokens: about 512 KiB of f32 per shard each way, so every pool is in play.
    for (let i = 0; i < 8; i++)
      await check(layer(i, 64 - (i % 3)), moeLayers[i % moeLayers.length]!);
    for (let i = 0; i < 6; i++)
      await Promise.all([
        check(layer(100 + i, 64), moeLayers[0]!),
        check(layer(200 + i, 48 + i), moeLayers[moeLayers.length - 1]!),
      ]);
  });

  // fp8 frames copy their rows from one table of codes per layer, in a buffer reused from
  // layer to layer: a layer of another size or two layers in flight must not mix tables.
  for (const dtype of ["fp8", "bf16"] as const) {
    it(`${dtype} dispatch: each layer's sums from its own wire-rounded activations`, async () => {
      const { layer, check } = await gateway(dtype);
      // 200 tokens: about 0.4 (fp8) or 0.8 MiB (bf16) of dispatch per shard, but 1.6 MiB of
      // f32 sums back: the request is split so that each reply fits max_payload too.
      for (let i = 0; i < 6; i++)
        await check(layer(400 + i, [64, 3, 200][i % 3]!), moeLayers[i % moeLayers.length]!);
      for (let i = 0; i < 4; i++)
        await Promise.all([
          check(layer(500 + i, 33), moeLayers[0]!),
          check(layer(600 + i, 7 + i), moeLayers[moeLayers.length - 1]!),
        ]);
    });
  }

  it("answers a frame whose reply would exceed max_payload with EM_WIRE_RANGE, and carries on", async () => {
    const nc = await connect({ servers: nats.info.url });
    ncs.push(nc);
    const layerNo = moeLayers[0]!;
    const expert = plan.layers[0]!.shardExperts[0]![0]!;
    // 160 fp8 tokens: 0.3 MiB of dispatch; asked back in f32: 1.25 MiB, over 1 MiB.
    const frame = (numTokens: number) =>
      encodeDispatch(
        {
          ...{ dtype: "fp8", planVersion: plan.version, layer: layerNo, hidden, tokenOffset: 0 },
          ...{ totalTokens: numTokens, numTokens },
          activations: new Float32Array(numTokens * hidden).fill(0.5),
          token: Uint32Array.from({ length: numTokens }, (_, i) => i),
          expert: new Uint32Array(numTokens).fill(expert),
          weight: new Float32Array(numTokens).fill(0.25),
        },
        FLAG_COMBINE_F32,
      );
    const shard0 = subjects.shard(model, 0);
    const big = decodeReply((await nc.request(shard0, frame(160), { timeout: 5000 })).data);
    expect(big.kind === "error" && big.code).toBe("EM_WIRE_RANGE");
    const small = decodeReply((await nc.request(shard0, frame(16), { timeout: 5000 })).data);
    expect(small.kind).toBe("combine");
  });

  it("coalesces frames that arrive together into one grouped FFN call, each reply its own", async () => {
    const { layer, check } = await gateway();
    const frames0 = servers.reduce((n, s) => n + s.totals.frames, 0);
    const calls0 = moeCalls;
    // Eight 1-token layers at once: each shard's eight frames (8 KiB each) leave the gateway
    // in one write and reach the shard together.
    await Promise.all(
      Array.from({ length: 8 }, (_, i) => check(layer(300 + i, 1), moeLayers[i % 2]!)),
    );
    const frames = servers.reduce((n, s) => n + s.totals.frames, 0) - frames0;
    const calls = moeCalls - calls0;
    expect(frames).toBeGreaterThanOrEqual(8);
    expect(calls).toBeLessThan(frames);
  });
});
