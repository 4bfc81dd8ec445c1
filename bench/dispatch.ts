// The dispatch suite: one MoE layer's dispatch-and-combine round trip through our codec,
// dispatcher and shard servers, against the raw NATS request-reply round trip carrying the
// same bytes (the transport floor), in the same run, interleaved (every order of the series in turn).
//
// What is measured: the data plane only. The shards run a backend whose expert FFN
// returns zeros of the right shape, so neither side computes experts (the kernel suite
// measures those). Everything else is real: a nats-server on loopback, frame encoding
// and decoding (bf16 or fp8 dispatch, bf16 combine), grouping by shard, splitting under
// max_payload, the shard's coalescing and reply, the gateway's reassembly and sums. Each
// shard runs in its own process, as in a deployment, and the raw floor's responder for that
// shard runs in the same process, so both sides cross the same process boundaries.
//
// Repeats: the whole grid of a shape is measured in `passes` passes (each row: warm-ups,
// then `runs` counted round trips, interleaved ours / raw / lean in every order in turn); a row's ratio is the median of
// its passes' ratios, so one noisy stretch of a shared machine moves one pass, not the row.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { RemoteExperts } from "../src/moe/dispatcher.ts";
import { Requester } from "../src/moe/requester.ts";
import { startNats } from "../test/env/nats.ts";
import { binaries } from "../test/env/paths.ts";
import {
  benchPlan,
  DISPATCH_SHAPES,
  DISPATCH_SHARDS,
  floorRequests,
  layerInputs,
} from "./dispatch-inputs.ts";
import { ORDERS_OF_THREE, type Stats, stats } from "./lib.ts";

export interface DispatchRow {
  hidden: number;
  topK: number;
  experts: number;
  shards: number;
  tokens: number;
  dtype: "bf16" | "fp8";
  /** Request bytes over all shards, and reply bytes. */
  requestBytes: number;
  replyBytes: number;
  /** Every counted run of every pass. */
  oursMs: Stats;
  rawMs: Stats;
  /** median(ours) / median(raw) of each pass. */
  passRatios?: number[];
  /** Median of passRatios. */
  ratio: number;
  /**
   * The lean floor (since 2026-11-29): the raw bytes through the dispatcher's requester
   * (src/moe/requester.ts, ADR 0004) instead of the client's request(); no codec, no
   * dispatcher. Absent in older results.
   */
  leanMs?: Stats;
  /** Median over the passes of median(ours) / median(lean). */
  leanRatio?: number;
  /**
   * CPU time per layer of every process involved (gateway, shards, nats-server), ours and
   * the raw floor, averaged over the counted runs (since 2026-11-29 05:40; absent before).
   * On a machine with fewer cores than busy processes, wall time is mostly waiting for a
   * core: this is the work itself.
   */
  oursCpuMs?: number;
  rawCpuMs?: number;
}

/**
 * CPU time (ms) used so far by this process (exact) and by the processes `pids` (user +
 * system from /proc, in clock ticks of 10 ms: unbiased over many runs, coarse for one).
 */
function cpuMs(pids: number[]): number {
  const own = process.cpuUsage();
  let ms = (own.user + own.system) / 1000;
  for (const pid of pids) {
    try {
      // Fields after the command name: state is field 3; utime and stime are 14 and 15.
      const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
      ms += (Number(f[11]) + Number(f[12])) * 10;
    } catch {
      // Not Linux, or the process is gone: its share is left out.
    }
  }
  return ms;
}

export async function runDispatch(opts: {
  runs: number;
  quick: boolean;
  log: (s: string) => void;
  /** Passes over the grid (default 5; 1 with quick). */
  passes?: number;
}): Promise<{ rows: DispatchRow[]; natsVersion: string; passes: number }> {
  const passes = opts.passes ?? (opts.quick ? 1 : 5);
  const dir = mkdtempSync(join(tmpdir(), "em-bench-dispatch-"));
  const nats = await startNats(binaries().natsServer, dir, dir);
  const ncs: NatsConnection[] = [];
  const children: ChildProcess[] = [];
  const rows: DispatchRow[] = [];
  try {
    const varz = (await (await fetch(`${nats.info.monitorUrl}/varz`)).json()) as {
      version: string;
    };
    const tokenCounts = opts.quick ? [1, 32, 256] : [1, 4, 16, 64, 128, 256];
    for (const shape of DISPATCH_SHAPES) {
      const plan = benchPlan(shape);
      const model = { namespace: "bench", model: `d${shape.hidden}` };
      // One process per shard (its shard server and its raw responder), as in a deployment.
      const shardChildren = Array.from({ length: DISPATCH_SHARDS }, (_, k) =>
        spawn(
          process.execPath,
          [
            fileURLToPath(new URL("./dispatch-shards.ts", import.meta.url)),
            nats.info.url,
            String(shape.hidden),
            String(shape.topK),
            String(shape.experts),
            String(shape.moe),
            String(k),
          ],
          { stdio: ["ignore", "pipe", "inherit"] },
        ),
      );
      children.push(...shardChildren);
      await Promise.all(
        shardChildren.map(
          (child) =>
            new Promise<void>((resolve, reject) => {
              child.stdout!.on("data", (d: Buffer) => d.toString().includes("ready") && resolve());
              child.on("exit", (code) => reject(new Error(`dispatch-shards exited ${code}`)));
            }),
        ),
      );
      const gw = await connect({ servers: nats.info.url });
      ncs.push(gw);
      await gw.flush();
      const lean = new Requester(gw);
      const cases: {
        dtype: "bf16" | "fp8";
        T: number;
        requestBytes: number;
        replyBytes: number;
        ours: () => Promise<number>;
        floor: () => Promise<number>;
        leanFloor: () => Promise<number>;
        a: number[];
        b: number[];
        c: number[];
        ratios: number[];
        leanRatios: number[];
        cpuOurs: number;
        cpuRaw: number;
      }[] = [];
      const pids = [...shardChildren.map((c) => c.pid!), nats.process.pid!];
      for (const dtype of ["bf16", "fp8"] as const) {
        const experts = new RemoteExperts({
          nc: gw,
          model,
          plan,
          dispatchDtype: dtype,
          combineDtype: "bf16",
        });
        for (const T of tokenCounts) {
          const { x, ids, weights } = layerInputs(shape, T);
          const layer = plan.layers[0]!;
          const { raw, requestBytes, replyBytes } = floorRequests(
            plan,
            shape,
            ids,
            dtype,
            (k) => `raw.${model.model}.${k}`,
          );
          const ours = async () => {
            const t0 = performance.now();
            const sums = await experts.run(
              layer.layer,
              x,
              T,
              shape.hidden,
              ids,
              weights,
              shape.topK,
            );
            const ms = performance.now() - t0;
            experts.release(sums); // as the engine does once it has added them up
            return ms;
          };
          const floor = async () => {
            const t0 = performance.now();
            await Promise.all(raw.map((q) => gw.request(q.subject, q.req, { timeout: 10_000 })));
            return performance.now() - t0;
          };
          const leanFloor = async () => {
            const t0 = performance.now();
            await Promise.all(raw.map((q) => lean.request(q.subject, q.req, 10_000)));
            return performance.now() - t0;
          };
          cases.push({
            dtype,
            T,
            requestBytes,
            replyBytes,
            ours,
            floor,
            leanFloor,
            a: [],
            b: [],
            c: [],
            ratios: [],
            leanRatios: [],
            cpuOurs: 0,
            cpuRaw: 0,
          });
        }
      }
      for (let pass = 0; pass < passes; pass++) {
        for (const c of cases) {
          for (let i = 0; i < (pass === 0 ? 3 : 1); i++) {
            await c.ours();
            await c.floor();
            await c.leanFloor();
          }
          const a: number[] = [];
          const b: number[] = [];
          const l: number[] = [];
          // The three series run in every order in turn (ORDERS_OF_THREE). (Until 2026-11-29 06:40 the order was
          // always ours, raw, lean: ours always ran after the lean floor.)
          const series = [
            { run: c.ours, out: a, cpu: (ms: number) => (c.cpuOurs += ms) },
            { run: c.floor, out: b, cpu: (ms: number) => (c.cpuRaw += ms) },
            { run: c.leanFloor, out: l, cpu: (_ms: number) => {} },
          ];
          for (let i = 0; i < opts.runs; i++) {
            for (let j = 0; j < series.length; j++) {
              const s = series[ORDERS_OF_THREE[i % ORDERS_OF_THREE.length]![j]!]!;
              // CPU is read outside the timed call.
              const cpu0 = cpuMs(pids);
              s.out.push(await s.run());
              s.cpu(cpuMs(pids) - cpu0);
            }
          }
          c.a.push(...a);
          c.b.push(...b);
          c.c.push(...l);
          c.ratios.push(stats(a).median / stats(b).median);
          c.leanRatios.push(stats(a).median / stats(l).median);
        }
      }
      for (const c of cases) {
        const row: DispatchRow = {
          hidden: shape.hidden,
          topK: shape.topK,
          experts: shape.experts,
          shards: DISPATCH_SHARDS,
          tokens: c.T,
          dtype: c.dtype,
          requestBytes: c.requestBytes,
          replyBytes: c.replyBytes,
          oursMs: stats(c.a),
          rawMs: stats(c.b),
          passRatios: c.ratios,
          ratio: stats(c.ratios).median,
          leanMs: stats(c.c),
          leanRatio: stats(c.leanRatios).median,
          oursCpuMs: c.cpuOurs / c.a.length,
          rawCpuMs: c.cpuRaw / c.b.length,
        };
        rows.push(row);
        opts.log(
          `dispatch hidden ${shape.hidden} top-${shape.topK} ${c.dtype} T=${c.T}: ours ${row.oursMs.median.toFixed(3)} ms, raw ${row.rawMs.median.toFixed(3)} ms, ratio ${row.ratio.toFixed(2)}, lean ${row.leanMs!.median.toFixed(3)} ms, ours / lean ${row.leanRatio!.toFixed(2)}, CPU ms ours ${row.oursCpuMs!.toFixed(2)} raw ${row.rawCpuMs!.toFixed(2)} (passes ${c.ratios.map((r) => r.toFixed(2)).join(", ")}; ${(c.requestBytes / 1024).toFixed(0)} KiB out)`,
        );
      }
      lean.close();
      for (const child of shardChildren) child.kill();
    }
    return { rows, natsVersion: varz.version, passes };
  } finally {
    for (const nc of ncs) await nc.close().catch(() => {});
    for (const c of children) c.kill();
    await nats.process.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}
