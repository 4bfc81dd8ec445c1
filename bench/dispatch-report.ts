// The dispatch suite's table for BENCHMARKS.md (generated from its results JSON).

import type { DispatchRow } from "./dispatch.ts";
import type { MachineInfo, Stats } from "./lib.ts";

export interface DispatchResults {
  suite: "dispatch";
  date: string;
  commit: string;
  dirty: boolean;
  machine: MachineInfo;
  natsVersion: string;
  runs: number;
  /**
   * How the series were interleaved: "all-orders" (since 2026-11-29 07:09: the six orders of
   * ours, raw, lean in turn); absent: always ours, raw, lean.
   */
  order?: "all-orders";
  rows: DispatchRow[];
}

const ms = (s: Stats) =>
  `${s.median.toFixed(2)} (${s.min.toFixed(2)}–${s.max.toFixed(2)})${(s.max - s.min) / s.median > 0.25 ? " ‡" : ""}`;
const kib = (b: number) =>
  b < 1024 * 1024 ? `${(b / 1024).toFixed(0)} KiB` : `${(b / 2 ** 20).toFixed(1)} MiB`;

export function dispatchTables(r: DispatchResults, source: string): string {
  const worst = Math.max(...r.rows.map((x) => x.ratio));
  const best = Math.min(...r.rows.map((x) => x.ratio));
  const met = r.rows.filter((x) => x.ratio <= 1.25).length;
  // Results before passes existed hold one pass per row.
  const passes = (x: DispatchRow) => x.passRatios ?? [x.ratio];
  const nPasses = Math.max(...r.rows.map((x) => passes(x).length));
  const ratio = (x: DispatchRow) => {
    const p = passes(x);
    return p.length > 1
      ? `**${x.ratio.toFixed(2)}** (${Math.min(...p).toFixed(2)}–${Math.max(...p).toFixed(2)})`
      : `**${x.ratio.toFixed(2)}**`;
  };
  const hasLean = r.rows.every((x) => x.leanMs !== undefined);
  const hasCpu = r.rows.every((x) => x.oursCpuMs !== undefined && x.rawCpuMs !== undefined);
  const cpuRatios = r.rows.map((x) => (x.oursCpuMs ?? 0) / (x.rawCpuMs ?? 1));
  const leanRatios = r.rows.map((x) => x.leanRatio ?? Number.NaN);
  const lines = [
    "### Dispatch: machine and run",
    "",
    "| | |",
    "| --- | --- |",
    `| CPU | ${r.machine.cpu}, ${r.machine.cores} cores${r.machine.hypervisor ? ", virtual machine" : ""} |`,
    `| transport | nats-server ${r.natsVersion} on loopback; ${
      nPasses > 1
        ? "gateway in this process; each of the 4 shard servers in its own process, with the raw responder of its shard"
        : "gateway in this process, 4 shard servers (and the raw responders) in a second process"
    } |`,
    `| run | ${r.date}, commit \`${r.commit}\`${r.dirty ? " (+ uncommitted changes)" : ""}, ${nPasses > 1 ? `${nPasses} passes over the grid, each with ${r.runs} counted runs per row` : `${r.runs} counted runs per row`}, interleaved ours / raw${hasLean ? " / lean" : ""}${r.order === "all-orders" ? " in all six orders in turn" : " in that order"}; data: [${source.split("/").pop()}](${source}) |`,
    "",
    "### Dispatch and combine against the raw NATS round trip",
    "",
    `Target: ours <= 1.25x raw at every size. Met on ${met} of ${r.rows.length} rows; ratios ${best.toFixed(2)}–${worst.toFixed(2)}. Times in ms, median (min–max) over all counted runs; ‡ marks a spread over 25% of the median.${nPasses > 1 ? " ours / raw: median of the passes' ratios (min–max of the passes)." : ""}${
      hasLean
        ? ` Lean floor: the same raw bytes through the dispatcher's own request-reply (ADR 0004) instead of the NATS client's request(), with no codec and no dispatcher; ours / lean (median of the passes) is the codec's and dispatcher's own share: ${Math.min(...leanRatios).toFixed(2)}–${Math.max(...leanRatios).toFixed(2)}.`
        : ""
    }${
      hasCpu
        ? ` CPU: milliseconds of CPU per layer of all the processes (gateway, shards, nats-server), ours / raw (their ratio: ${Math.min(...cpuRatios).toFixed(2)}–${Math.max(...cpuRatios).toFixed(2)}), averaged over the counted runs; the machine has fewer cores than busy processes, so the wall time is largely waiting for a core and grows with this work.`
        : ""
    }`,
    "",
    ...(hasLean
      ? [
          `| hidden | top-k | tokens | dispatch | bytes out | bytes back | ours ms | raw ms | ours / raw | lean ms | ours / lean |${hasCpu ? " CPU ms ours / raw |" : ""}`,
          `| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |${hasCpu ? " --- |" : ""}`,
        ]
      : [
          "| hidden | top-k | tokens | dispatch | bytes out | bytes back | ours ms | raw ms | ours / raw |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]),
    ...r.rows.map(
      (x) =>
        `| ${x.hidden} | ${x.topK} | ${x.tokens} | ${x.dtype} | ${kib(x.requestBytes)} | ${kib(x.replyBytes)} | ${ms(x.oursMs)} | ${ms(x.rawMs)} | ${ratio(x)} |${
          hasLean && x.leanMs ? ` ${ms(x.leanMs)} | ${x.leanRatio!.toFixed(2)} |` : ""
        }${
          hasCpu
            ? ` ${x.oursCpuMs!.toFixed(1)} / ${x.rawCpuMs!.toFixed(1)} (${(x.oursCpuMs! / x.rawCpuMs!).toFixed(2)}) |`
            : ""
        }`,
    ),
  ];
  return lines.join("\n");
}
