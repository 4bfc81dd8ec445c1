// The serve suite's tables for BENCHMARKS.md (generated from its results JSON).

import type { Stats } from "./lib.ts";
import type { ServeResults } from "./serve.ts";

const f = (v: number, d = 1) => (Number.isFinite(v) ? v.toFixed(d) : "-");
const range = (s: Stats, d = 1) =>
  `${f(s.median, d)} (${f(s.min, d)}–${f(s.max, d)})${s.n > 1 && (s.max - s.min) / s.median > 0.25 ? " ‡" : ""}`;

export function serveTables(r: ServeResults, source: string): string {
  const p = r.peer;
  const lines = [
    "### Serving: machine and run",
    "",
    "| | |",
    "| --- | --- |",
    `| CPU | ${r.machine.cpu}, ${r.machine.cores} cores${r.machine.hypervisor ? ", virtual machine" : ""} |`,
    `| model | ${r.model.name} (make-tiny-model --arch v3 --preset mini): hidden ${r.model.hiddenSize}, ${r.model.layers} layers, ${r.model.routedExperts} routed experts, top-${r.model.topK}, bf16 on disk |`,
    `| distributed | nats-server ${r.natsVersion} on loopback, ${r.shards} shard processes, gateway process (\`gateway --nats --plan\`) |`,
    "| single-process | `gateway --local` (both gateways up at once, measured alternately level by level) |",
    `| load | streaming chat completions over HTTP, fixed prompts, temperature 0, max_tokens ${r.maxTokens} |`,
    `| run | ${r.date}, commit \`${r.commit}\`${r.dirty ? " (+ uncommitted changes)" : ""}, ${f(r.seconds, 0)} s; data: [${source.split("/").pop()}](${source}) |`,
    "",
    "### Batch 1 against Hugging Face transformers",
    "",
    `Peer: transformers ${p.transformers} \`generate\` (torch ${p.torch}), ${p.dtype}, ${p.threads} threads, greedy, ${p.newTokens} new tokens forced (min = max new tokens), prompt ${p.promptTokens} tokens (the same chat template), ${p.peerTokS.n} runs interleaved one to one with ours. Ours: the single-process gateway, one streaming request at a time, completion tokens / request time (HTTP and prefill included). Tokens/s, median (min–max); ‡ marks a spread over 25% of the median.`,
    "",
    "| ours tok/s | transformers tok/s | ours / transformers |",
    "| --- | --- | --- |",
    `| ${range(p.oursTokS)} | ${range(p.peerTokS)} | **${f(p.ratio, 2)}** |`,
    "",
    "### Throughput and latency against concurrency",
    "",
    "Output tok/s = completion tokens of all requests / wall time of the level. TTFT: request sent to first content chunk; ITL: gaps between content chunks (one per token, except where the gateway holds back text that could still be a stop string or an unfinished UTF-8 character). p50/p99 in ms. One pass per level (no repetitions): read differences under ~20% as noise.",
    "",
    "| config | concurrency | requests | errors | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ...r.levels.map(
      (x) =>
        `| ${x.config} | ${x.concurrency} | ${x.requests} | ${x.errors} | **${f(x.tokensPerSecond)}** | ${f(x.ttftP50, 0)} | ${f(x.ttftP99, 0)} | ${f(x.itlP50)} | ${f(x.itlP99)} |`,
    ),
  ];
  return lines.join("\n");
}
