// Child process of the dispatch suite: one shard server whose expert FFN returns zeros, and
// the raw floor's responder for the same shard, for one shape. One process per shard, as in
// a deployment (the suite starts one per shard); the floor's responder lives in the same
// process, so both sides pay the same per-process costs. Prints "ready" when subscribed.
//   node bench/dispatch-shards.ts NATS_URL HIDDEN TOPK EXPERTS MOE_INTERMEDIATE SHARD
import { connect } from "@nats-io/transport-node";
import type { MlpWeights } from "../src/engine/loader.ts";
import { ShardServer } from "../src/moe/shard-server.ts";
import { benchPlan } from "./dispatch-inputs.ts";
import { noComputeBackend } from "./no-compute.ts";

const [url, hiddenS, topKS, expertsS, , shardS] = process.argv.slice(2);
const hidden = Number(hiddenS);
const k = Number(shardS);
const plan = benchPlan({ topK: Number(topKS), experts: Number(expertsS) });
const model = { namespace: "bench", model: `d${hidden}` };
const fake = { gate: { cols: hidden } } as unknown as MlpWeights;
const nc = await connect({ servers: url! });
const held = new Map(
  plan.layers.map((l) => [l.layer, new Map(l.shardExperts[k]!.map((e) => [e, fake]))]),
);
new ShardServer({
  nc,
  model,
  shard: k,
  id: "bench",
  plan,
  backend: noComputeBackend,
  experts: held,
}).start(60_000);
// The raw floor's responder: answers with as many bytes as the request's first u32 says.
nc.subscribe(`raw.${model.model}.${k}`, {
  callback: (_e, m) => {
    m.respond(new Uint8Array(new DataView(m.data.buffer, m.data.byteOffset).getUint32(0, true)));
  },
});
await nc.flush();
// Exit cleanly on the suite's SIGTERM, so that `node --cpu-prof` can write this side's profile.
process.on("SIGTERM", () => process.exit(0));
process.stdout.write("ready\n");
