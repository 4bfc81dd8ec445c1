// The data plane's own code in one process, without NATS or other processes: a shard's path
// per dispatch frame (decode, check, group, the FFN stand-in of the dispatch suite, encode
// the reply) and the gateway's per layer (route, encode four frames, add four cached
// replies), each driven through a stand-in connection. CPU microseconds per frame / layer,
// for A/B comparisons of a change to src/moe; in the dispatch suite the same code costs
// ~3x this on a busy 2-core machine (cold caches, preemption), and the suite is the
// measurement of record. Found, for one: every typed array over 64 bytes is an off-heap
// allocation of ~1 µs (commit 786ce31).
//
//   node bench/dispatch-inproc.ts [--hidden 2048] [--tokens 16] [--dtype bf16|fp8] [--n 20000]
import { parseArgs } from "node:util";
import type { MlpWeights } from "../src/engine/loader.ts";
import { RemoteExperts } from "../src/moe/dispatcher.ts";
import { ShardServer } from "../src/moe/shard-server.ts";
import { encodeCombine, encodeDispatchRows, type WireDtypeName } from "../src/moe/wire.ts";
import { benchPlan, layerInputs, shapeFor } from "./dispatch-inputs.ts";
import { noComputeBackend } from "./no-compute.ts";

const { values } = parseArgs({
  options: {
    hidden: { type: "string", default: "2048" },
    tokens: { type: "string", default: "16" },
    dtype: { type: "string", default: "bf16" },
    n: { type: "string", default: "20000" },
  },
});
const hidden = Number(values.hidden);
const shape = shapeFor(hidden);
const { topK } = shape;
const T = Number(values.tokens);
const dtype = (values.dtype === "fp8" ? "fp8" : "bf16") as WireDtypeName;
const N = Number(values.n);
const plan = benchPlan(shape);
const layer = plan.layers[0]!;
const model = { namespace: "bench", model: "inproc" };

const { x, ids, weights } = layerInputs(shape, T);

/** Runs `step` n times per round, 5 rounds; prints CPU µs per step of each round. */
async function measure(name: string, step: () => unknown): Promise<void> {
  const perRound: string[] = [];
  for (let round = 0; round < 5; round++) {
    const c0 = process.cpuUsage();
    for (let i = 0; i < N; i++) await step();
    const c = process.cpuUsage(c0);
    perRound.push(((c.user + c.system) / N).toFixed(1));
  }
  console.log(`${name}: ${perRound.join(", ")} µs CPU (rounds of ${N})`);
}

// ---- a shard: shard 0's frame of this layer, answered through a stand-in connection.
const fake = { gate: { cols: hidden } } as unknown as MlpWeights;
let deliver: ((err: unknown, msg: unknown) => void) | undefined;
/** The client's outbound queue as ReplyBuffers reads it: empty, as after every flush. */
const shardConn = {
  protocol: { outbound: { buffers: [] } },
  info: { max_payload: 8 << 20 },
  subscribe: (subject: string, o: { callback: (err: unknown, msg: unknown) => void }) => {
    if (subject.includes(".shard.")) deliver = o.callback;
    return { unsubscribe() {} };
  },
  publish() {},
};
new ShardServer({
  nc: shardConn as never,
  model,
  shard: 0,
  id: "inproc",
  plan,
  backend: noComputeBackend,
  experts: new Map([[layer.layer, new Map(layer.shardExperts[0]!.map((e) => [e, fake]))]]),
}).start(1e9);
const mine = new Set(layer.shardExperts[0]);
const rows: number[] = [];
const token: number[] = [];
const expert: number[] = [];
for (let t = 0; t < T; t++) {
  const hits = [...ids.subarray(t * topK, (t + 1) * topK)].filter((e) => mine.has(e));
  if (hits.length) rows.push(t);
  for (const e of hits) {
    token.push(rows.length - 1);
    expert.push(e);
  }
}
const frame = encodeDispatchRows(
  {
    dtype,
    planVersion: plan.version,
    layer: layer.layer,
    hidden,
    tokenOffset: 0,
    totalTokens: rows.length,
    x,
    rows: Int32Array.from(rows),
    token: Uint32Array.from(token),
    expert: Uint32Array.from(expert),
    weight: new Float32Array(token.length).fill(1 / topK),
  },
  0,
);
let answered = 0;
const msg = {
  data: frame,
  respond: () => {
    answered++;
    return true;
  },
};
console.log(
  `hidden ${hidden} ${dtype}, ${T} tokens: shard 0 gets ${rows.length} rows, ${token.length} assignments`,
);
// The shard computes in a microtask after the frame arrives: `await null` lets it run.
await measure("shard, per frame  ", async () => {
  deliver!(null, msg);
  await null;
});
if (answered !== 5 * N) throw new Error(`the shard answered ${answered} of ${5 * N} frames`);

// ---- the gateway: one layer over 4 shards whose replies are cached, delivered at once.
let inbox: ((err: unknown, msg: unknown) => void) | undefined;
const replies = new Map<string, Uint8Array>();
const gatewayConn = {
  info: { max_payload: 8 << 20 },
  subscribe: (_s: string, o: { callback: (err: unknown, msg: unknown) => void }) => {
    inbox = o.callback;
    return { isClosed: () => false, unsubscribe() {} };
  },
  publish: (_s: string, data: Uint8Array, o: { reply: string }) => {
    const v = new DataView(data.buffer, data.byteOffset);
    const numTokens = v.getUint32(20, true);
    let r = replies.get(`${numTokens}`);
    if (!r) {
      r = encodeCombine({
        planVersion: v.getUint32(8, true),
        layer: v.getUint32(12, true),
        hidden,
        tokenOffset: 0,
        totalTokens: numTokens,
        numTokens,
        dtype: "bf16",
        sums: new Float32Array(numTokens * hidden),
      });
      replies.set(`${numTokens}`, r);
    }
    const reply = { subject: o.reply, data: r, headers: undefined };
    queueMicrotask(() => inbox!(null, reply));
  },
};
const gateway = new RemoteExperts({
  nc: gatewayConn as never,
  model,
  plan,
  dispatchDtype: dtype,
});
await measure("gateway, per layer", async () => {
  gateway.release(await gateway.run(layer.layer, x, T, hidden, ids, weights, topK));
});
gateway.close();
