// Dispatch frames that decode but say odd things, sent straight to a real shard process over
// a real nats-server, from a fixed seed: header fields (plan version, layer, width, token
// counts and offsets) and assignments (token indices, experts, weights) out of range, NaN
// and infinite activations and weights, and body bytes flipped with the checksum fixed up
// (so that they pass it and reach the shard's own checks and its native kernels). Every
// frame must be answered with a combine or an error frame with a stable EM_* code, and
// the shard must live on and answer a valid frame as before.
// EM_FUZZ_ITERATIONS (default 300) and EM_FUZZ_SEED widen a campaign.
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { wireCodec } from "../../src/moe/codec.ts";
import { subjects } from "../../src/moe/subjects.ts";
import { type Dispatch, decodeFrame, encodeDispatch, HEADER_BYTES } from "../../src/moe/wire.ts";
import { testEnv } from "../support/env.ts";
import { rng } from "../support/fuzz.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Cluster, metricsPort, startShards, stopAll } from "../support/shards.ts";

const ITERATIONS = Number(process.env["EM_FUZZ_ITERATIONS"] ?? 300);
const SEED = Number(process.env["EM_FUZZ_SEED"] ?? 20261201);

let cluster: Cluster | undefined;
let nc: NatsConnection;

beforeAll(async () => {
  cluster = await startShards(await tinyCheckpointFor("tiny-v3"), 2);
  nc = await connect({ servers: testEnv().nats.url });
});

afterAll(async () => {
  await nc?.close();
  await stopAll(cluster);
});

describe(`shard fuzz (${ITERATIONS} frames, seed ${SEED})`, () => {
  it("answers every decodable frame with a combine or a stable error, and lives on", async () => {
    const c = cluster!;
    const subject = subjects.shard(c.ref, 0);
    const layer0 = c.plan.layers[0]!;
    const held = layer0.shardExperts[0]!;
    const hidden = 64;
    const r = rng(SEED);
    const odd = (xs: number[]) => r.pick(xs);
    const valid = (): Dispatch => {
      const n = 1 + r.int(4);
      const k = 1 + r.int(3);
      const activations = new Float32Array(n * hidden);
      for (let i = 0; i < activations.length; i++) activations[i] = r.next() - 0.5;
      return {
        dtype: r.pick(["bf16", "f32", "fp8"] as const),
        planVersion: c.plan.version,
        layer: layer0.layer,
        hidden,
        numTokens: n,
        tokenOffset: 0,
        totalTokens: n,
        activations,
        token: Uint32Array.from({ length: n * k }, (_, i) => i % n),
        expert: Uint32Array.from({ length: n * k }, () => r.pick(held)),
        weight: Float32Array.from({ length: n * k }, () => r.next()),
      };
    };
    const mutators: ((d: Dispatch) => void)[] = [
      (d) => {
        d.planVersion = odd([0, d.planVersion + 1, 2 ** 32 - 1]);
      },
      (d) => {
        d.layer = odd([0, 1, 2, 99, 2 ** 16 - 1]);
      },
      (d) => {
        d.hidden = odd([0, 1, 32, 63, 128]);
        d.activations = new Float32Array(d.numTokens * d.hidden);
      },
      (d) => {
        d.tokenOffset = odd([1, d.totalTokens, 2 ** 31]);
      },
      (d) => {
        d.totalTokens = odd([0, d.numTokens - 1, 2 ** 31]);
      },
      (d) => {
        d.token[r.int(d.token.length)] = odd([d.numTokens, d.numTokens + 1, 2 ** 32 - 1]);
      },
      (d) => {
        d.expert[r.int(d.expert.length)] = odd([10_000, 2 ** 32 - 1, ...layer0.shardExperts[1]!]);
      },
      (d) => {
        d.weight[r.int(d.weight.length)] = odd([Number.NaN, Number.POSITIVE_INFINITY, -1, 1e38]);
      },
      (d) => {
        d.activations[r.int(d.activations.length)] = odd([
          Number.NaN,
          Number.NEGATIVE_INFINITY,
          3e38,
        ]);
      },
      (d) => {
        d.token = new Uint32Array(0);
        d.expert = new Uint32Array(0);
        d.weight = new Float32Array(0);
      },
      (d) => {
        d.numTokens = 0;
        d.totalTokens = 0;
        d.activations = new Float32Array(0);
        d.token = new Uint32Array(0);
        d.expert = new Uint32Array(0);
        d.weight = new Float32Array(0);
      },
    ];
    const failures: string[] = [];
    const kinds = new Map<string, number>();
    for (let i = 0; i < ITERATIONS && failures.length < 10; i++) {
      const d = valid();
      for (let m = 1 + r.int(2); m > 0; m--) r.pick(mutators)(d);
      let frame: Uint8Array;
      try {
        frame = encodeDispatch(d);
      } catch {
        continue; // the encoder refused it: never sent
      }
      if (r.next() < 0.3) {
        // Body bytes flipped, the checksum fixed up: past the CRC, into the shard's checks.
        for (let f = 1 + r.int(4); f > 0; f--)
          frame[HEADER_BYTES + r.int(frame.length - HEADER_BYTES)]! ^= 1 + r.int(255);
        new DataView(frame.buffer, frame.byteOffset).setUint32(
          36,
          wireCodec().crc32(frame.subarray(HEADER_BYTES)),
          true,
        );
      }
      let what: string;
      try {
        const reply = decodeFrame((await nc.request(subject, frame, { timeout: 10_000 })).data);
        what = reply.kind === "error" ? reply.code : reply.kind;
        if (reply.kind === "error" && !/^EM_[A-Z0-9_]+$/.test(reply.code))
          failures.push(`#${i}: code ${reply.code}`);
        if (reply.kind === "error" && /INTERNAL/.test(reply.code))
          failures.push(`#${i}: ${reply.code} ${reply.message}`);
        if (reply.kind === "dispatch") failures.push(`#${i}: a dispatch back`);
      } catch (e) {
        failures.push(
          `#${i}: no reply (${(e as Error).message}) to ${JSON.stringify({ ...d, activations: d.activations.length })}`,
        );
        continue;
      }
      kinds.set(what, (kinds.get(what) ?? 0) + 1);
    }
    if (process.env["EM_FUZZ_VERBOSE"]) console.log(Object.fromEntries(kinds));
    expect(failures, failures.join("\n")).toEqual([]);
    expect(kinds.get("combine") ?? 0).toBeGreaterThan(0);
    expect([...kinds.keys()].filter((k) => k.startsWith("EM_")).length).toBeGreaterThanOrEqual(2);
    for (const s of c.shards) expect(s.exited).toBe(false);
    // Serving as before: a valid frame, and the readiness probe.
    const ok = decodeFrame(
      (await nc.request(subject, encodeDispatch({ ...valid(), dtype: "f32" }), { timeout: 5000 }))
        .data,
    );
    expect(ok.kind).toBe("combine");
    expect((await fetch(`http://127.0.0.1:${metricsPort(c.shards[0]!)}/readyz`)).status).toBe(200);
  });
});
