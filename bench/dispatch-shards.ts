// Child process of the dispatch suite: four shard servers whose expert FFN returns zeros,
// and the raw floor's responders, for one shape. Prints "ready" when subscribed.
//   node bench/dispatch-shards.ts NATS_URL HIDDEN TOPK EXPERTS MOE_INTERMEDIATE
import { connect } from "@nats-io/transport-node";
import type { Backend, MoeArgs } from "../src/engine/backend.ts";
import type { MlpWeights } from "../src/engine/loader.ts";
import { planPlacement } from "../src/moe/placement.ts";
import { ShardServer } from "../src/moe/shard-server.ts";

/** Expert FFN that returns zeros: the suite measures transport and codec, not compute. */
const noCompute = {
  name: "no-compute",
  moe: (a: MoeArgs) => new Float32Array(a.numOut * a.dim),
} as unknown as Backend;

const [url, hiddenS, topKS, expertsS] = process.argv.slice(2);
const hidden = Number(hiddenS);
const plan = planPlacement({
  architecture: {
    numLayers: 2,
    firstDenseLayers: 1,
    routedExperts: Number(expertsS),
    expertsPerToken: Number(topKS),
  },
  numShards: 4,
});
const model = { namespace: "bench", model: `d${hidden}` };
const fake = { gate: { cols: hidden } } as unknown as MlpWeights;
for (let k = 0; k < 4; k++) {
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
    backend: noCompute,
    experts: held,
  }).start(60_000);
  // The raw floor's responder: answers with as many bytes as the request's first u32 says.
  nc.subscribe(`raw.${model.model}.${k}`, {
    callback: (_e, m) => {
      m.respond(new Uint8Array(new DataView(m.data.buffer, m.data.byteOffset).getUint32(0, true)));
    },
  });
  await nc.flush();
}
// Exit cleanly on the suite's SIGTERM, so that `node --cpu-prof` can write this side's profile.
process.on("SIGTERM", () => process.exit(0));
process.stdout.write("ready\n");
