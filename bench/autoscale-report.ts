// Tables and the plot of the autoscale suite (bench/autoscale.ts) for BENCHMARKS.md.
import type { AutoscaleResults, SimPoint, StepResult } from "./autoscale.ts";

const f = (n: number | null, d = 0) => (n === null ? "never" : n.toFixed(d));

export function autoscaleTables(r: AutoscaleResults): string {
  const steps = r.steps
    .map(
      (s) =>
        `| ${s.name} | ${f(s.firstScaleUpAfterS)} s | ${f(s.settledAfterS)} s | ${Math.max(...s.points.map((p) => p.desired))} | ${s.points.find((p) => p.t === s.dropAt - 20)?.desired} | ${f(s.firstScaleDownAfterS)} s | ${s.replicaChanges} |`,
    )
    .join("\n");
  const imb = r.imbalance
    .map(
      (i) =>
        `| ${i.model} | ${i.shards} + ${i.redundant} slots | ${i.skew} | ${i.uniformPlan.toFixed(3)} | ${i.rebalancedInSample.toFixed(3)} | ${i.rebalancedNextWindow.toFixed(3)} |`,
    )
    .join("\n");
  return `| run | load step -> first scale-up | step -> queue within target for 30 s | most replicas | replicas before the drop | drop -> first scale-down | replica changes |
|---|---:|---:|---:|---:|---:|---:|
${steps}

Square-wave load (7000 / 1500 tokens/s, period 60 s, 30 min): ${r.oscillating.changes} replica changes, ${r.oscillating.downs} of them down; replica counts visited: ${r.oscillating.replicas.join(", ")} (it climbs once and settles; no up-down-up).

| model | shards | expert load | uniform plan | rebalanced (same window) | rebalanced (next window) |
|---|---|---|---:|---:|---:|
${imb}`;
}

/** Two panels over time: queue depth per ready replica vs target; desired and ready replicas. */
export function autoscaleSvg(s: StepResult, target: number, mu: number): string {
  const W = 760;
  const H = 420;
  const left = 60;
  const right = 20;
  const panel = [
    { top: 30, height: 150 },
    { top: 230, height: 150 },
  ];
  const tMax = s.points.at(-1)!.t;
  const x = (t: number) => left + ((W - left - right) * t) / tMax;
  const qMax = Math.max(target * 2, ...s.points.map((p) => p.queue)) * 1.05;
  const rMax = Math.max(...s.points.map((p) => p.desired)) + 2;
  const y = (i: number, v: number, max: number) =>
    panel[i]!.top + panel[i]!.height - (panel[i]!.height * v) / max;
  const path = (
    pts: SimPoint[],
    v: (p: SimPoint) => number,
    i: number,
    max: number,
    step = false,
  ) =>
    pts
      .map((p, k) => {
        const px = x(p.t).toFixed(1);
        const py = y(i, v(p), max).toFixed(1);
        if (k === 0) return `M${px},${py}`;
        return step ? `H${px}V${py}` : `L${px},${py}`;
      })
      .join("");
  const axis = (i: number, max: number, label: string, ticks: number[]) => {
    const { top, height } = panel[i]!;
    const lines = ticks
      .map(
        (v) =>
          `<line x1="${left}" x2="${W - right}" y1="${y(i, v, max).toFixed(1)}" y2="${y(i, v, max).toFixed(1)}" stroke="#ddd"/><text x="${left - 6}" y="${(y(i, v, max) + 4).toFixed(1)}" text-anchor="end">${v}</text>`,
      )
      .join("");
    return `${lines}<line x1="${left}" x2="${left}" y1="${top}" y2="${top + height}" stroke="#333"/><line x1="${left}" x2="${W - right}" y1="${top + height}" y2="${top + height}" stroke="#333"/><text x="${left}" y="${top - 8}" font-weight="bold">${label}</text>`;
  };
  const tTicks = Array.from({ length: Math.floor(tMax / 300) + 1 }, (_, k) => k * 300)
    .map(
      (t) =>
        `<text x="${x(t).toFixed(1)}" y="${panel[1]!.top + panel[1]!.height + 16}" text-anchor="middle">${t}</text>`,
    )
    .join("");
  const qTicks = [0, target, Math.round(qMax / 2 / 50) * 50].filter(
    (v, i, a) => a.indexOf(v) === i,
  );
  const rTicks = Array.from({ length: Math.floor(rMax / 4) + 1 }, (_, k) => k * 4);
  const needed = (p: SimPoint) => p.lambda / (mu * 0.5);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">
<title>Autoscaling simulation: pending tokens per shard replica and replicas over time under a 5x load step</title>
<rect width="${W}" height="${H}" fill="white"/>
${axis(0, qMax, "Pending tokens per ready shard replica (target dashed)", qTicks)}
<line x1="${left}" x2="${W - right}" y1="${y(0, target, qMax).toFixed(1)}" y2="${y(0, target, qMax).toFixed(1)}" stroke="#d62728" stroke-dasharray="5,4"/>
<path d="${path(s.points, (p) => p.queue, 0, qMax)}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
${axis(1, rMax, "Replicas: desired (decided), ready (serving), needed at utilization 0.5 (dotted)", rTicks)}
<path d="${path(s.points, needed, 1, rMax, true)}" fill="none" stroke="#999" stroke-dasharray="2,3" stroke-width="1.5"/>
<path d="${path(s.points, (p) => p.desired, 1, rMax, true)}" fill="none" stroke="#ff7f0e" stroke-width="2"/>
<path d="${path(s.points, (p) => p.ready, 1, rMax, true)}" fill="none" stroke="#2ca02c" stroke-width="1.5"/>
${tTicks}
<text x="${(W + left) / 2}" y="${H - 4}" text-anchor="middle">time (s); load steps 1200 -> 6000 tokens/s at ${s.stepAt} s and -> 800 at ${s.dropAt} s; one replica computes ${mu} tokens/s</text>
<text x="${W - right - 150}" y="${panel[1]!.top + 14}" fill="#ff7f0e">desired</text><text x="${W - right - 100}" y="${panel[1]!.top + 14}" fill="#2ca02c">ready</text><text x="${W - right - 60}" y="${panel[1]!.top + 14}" fill="#777">needed</text>
</svg>
`;
}
