// A quick look at the dispatch round trip while working on the data plane: one shape, a few
// token counts, many interleaved layers (ours / raw request() / lean requester), medians
// printed, nothing written. The dispatch suite (`npm run bench -- --suite dispatch`) is the
// measurement of record; this is for A/B comparisons of a change (run each variant in
// several alternating rounds: single runs on a shared 2-core machine differ by ~0.05x).
//
//   node bench/dispatch-quick.ts [--hidden 7168] [--tokens 1,4,16] [--layers 300] [--dtype bf16|fp8]
//                                [--profile DIR]   (the shards' CPU profiles; the gateway's: node --cpu-prof)
//                                [--cpu]           (also each series alone, CPU per layer of each process)
//                                [--order all|fixed] (series in all six orders in turn, or always ours raw lean)
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PerformanceObserver } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { connect } from "@nats-io/transport-node";
import { RemoteExperts } from "../src/moe/dispatcher.ts";
import { Requester } from "../src/moe/requester.ts";
import { startNats } from "../test/env/nats.ts";
import { binaries } from "../test/env/paths.ts";
import {
  benchPlan,
  DISPATCH_SHARDS,
  floorRequests,
  layerInputs,
  shapeFor,
} from "./dispatch-inputs.ts";
import { ORDERS_OF_THREE, stats } from "./lib.ts";

/** CPU ms used so far by process `pid` (user + system, from /proc; 10 ms ticks). */
function cpuOf(pid: number): number {
  if (pid === process.pid) {
    const u = process.cpuUsage();
    return (u.user + u.system) / 1000;
  }
  const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return (Number(f[11]) + Number(f[12])) * 10;
}

/** Milliseconds this process spent in garbage collection since the counter was last reset. */
let gcMs = 0;
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) gcMs += e.duration;
}).observe({ entryTypes: ["gc"] });

const { values } = parseArgs({
  options: {
    hidden: { type: "string", default: "7168" },
    tokens: { type: "string", default: "1,4,16" },
    layers: { type: "string", default: "300" },
    dtype: { type: "string", default: "bf16" },
    /** A folder for the shard processes' CPU profiles (node --cpu-prof). */
    profile: { type: "string" },
    /** Also run each series alone and print every process's CPU per layer. */
    cpu: { type: "boolean", default: false },
    /** "all": the six orders of the series in turn (default); "fixed": always ours, raw, lean. */
    order: { type: "string", default: "all" },
  },
});
const hidden = Number(values.hidden);
const shape = shapeFor(hidden);
const { topK, experts } = shape;
const layers = Number(values.layers);
const dtype = values.dtype === "fp8" ? "fp8" : "bf16";
const numShards = DISPATCH_SHARDS;
const plan = benchPlan(shape);
const model = { namespace: "bench", model: `d${hidden}` };
const dir = mkdtempSync(join(tmpdir(), "em-dispatch-quick-"));
const nats = await startNats(binaries().natsServer, dir, dir);
const shards: ChildProcess[] = [];
try {
  for (let k = 0; k < numShards; k++) {
    const child = spawn(
      process.execPath,
      [
        ...(values.profile ? ["--cpu-prof", `--cpu-prof-dir=${values.profile}`] : []),
        fileURLToPath(new URL("./dispatch-shards.ts", import.meta.url)),
        nats.info.url,
        String(hidden),
        String(topK),
        String(experts),
        String(shape.moe),
        String(k),
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    shards.push(child);
    await new Promise<void>((resolve) =>
      child.stdout!.on("data", (d: Buffer) => d.toString().includes("ready") && resolve()),
    );
  }
  const gw = await connect({ servers: nats.info.url });
  const ours = new RemoteExperts({ nc: gw, model, plan, dispatchDtype: dtype });
  const lean = new Requester(gw);
  const layer = plan.layers[0]!;
  for (const T of values.tokens.split(",").map(Number)) {
    const { x, ids, weights } = layerInputs(shape, T);
    // The floors' requests: the same bytes per shard as the dispatcher sends.
    const { raw } = floorRequests(plan, shape, ids, dtype, (k) => `raw.${model.model}.${k}`);
    const timed = async (fn: () => Promise<unknown>) => {
      const t0 = performance.now();
      await fn();
      return performance.now() - t0;
    };
    const ourSeries = async () => {
      const sums = await ours.run(layer.layer, x, T, hidden, ids, weights, topK);
      ours.release(sums);
    };
    const rawSeries = () =>
      Promise.all(raw.map((q) => gw.request(q.subject, q.req, { timeout: 10_000 })));
    const leanSeries = () => Promise.all(raw.map((q) => lean.request(q.subject, q.req, 10_000)));
    const series = [ourSeries, rawSeries, leanSeries];
    const times: number[][] = [[], [], []];
    for (let i = 0; i < layers + 20; i++) {
      const order = values.order === "fixed" ? ORDERS_OF_THREE[0] : ORDERS_OF_THREE[i % 6]!;
      for (const s of order) {
        const t = await timed(series[s]!);
        if (i >= 20) times[s]!.push(t); // the first 20: warm-up
      }
    }
    const [a, b, c] = times as [number[], number[], number[]];
    if (values.cpu) {
      // Each series alone, so that every process's CPU is that series' work.
      const pids = [process.pid, ...shards.map((s) => s.pid!), nats.info.pid];
      const named: [string, () => Promise<unknown>][] = [
        ["ours", ourSeries],
        ["raw", rawSeries],
        ["lean", leanSeries],
      ];
      for (const [name, fn] of named) {
        const before = pids.map(cpuOf);
        gcMs = 0;
        for (let i = 0; i < layers; i++) await fn();
        // The last collections' entries arrive on a later turn.
        await new Promise((r) => setTimeout(r, 50));
        const per = pids.map((p, i) => (cpuOf(p) - before[i]!) / layers);
        const total = per.reduce((s, v) => s + v, 0);
        console.log(
          `  cpu ${name.padEnd(4)} ms/layer: total ${total.toFixed(2)} = gateway ${per[0]!.toFixed(2)} + shards ${per
            .slice(1, 5)
            .map((v) => v.toFixed(2))
            .join(
              " ",
            )} + nats ${per[5]!.toFixed(2)}; gateway's collector ${(gcMs / layers).toFixed(2)}`,
        );
      }
    }
    const [ma, mb, mc] = [stats(a).median, stats(b).median, stats(c).median];
    console.log(
      `hidden ${hidden} ${dtype} T=${T}: ours ${ma.toFixed(3)} ms, raw ${mb.toFixed(3)} ms, lean ${mc.toFixed(3)} ms; ours/raw ${(ma / mb).toFixed(3)}, ours/lean ${(ma / mc).toFixed(3)}`,
    );
  }
  ours.close();
  lean.close();
  await gw.close();
} finally {
  for (const child of shards) child.kill();
  await nats.process.stop();
  rmSync(dir, { recursive: true, force: true });
}
