// JSON log lines (--log-format json, src/util/log.ts) of real processes: a shard and a
// distributed gateway over the test nats-server, the gateway with --log-requests and traces
// to a real OpenTelemetry Collector. Every line each writes is one JSON object; a request's
// line carries its id, status, tokens (equal to the answer's usage) and the trace id its span
// has at the collector. A command that fails says so in JSON too.
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../support/cli.ts";
import { waitFor } from "../support/env.ts";
import { startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { type Collector, startCollector } from "../support/otelcol.ts";
import { type Cluster, startShards } from "../support/shards.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const jsonLines = (text: string) =>
  text
    .split("\n")
    .filter((l) => l.trim() !== "")
    .map((l) => {
      try {
        return JSON.parse(l) as Record<string, unknown>;
      } catch {
        throw new Error(`a log line that is not JSON: ${l}`);
      }
    });

let dir: string;
let collector: Collector;
let cluster: Cluster;
beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  collector = await startCollector("otelcol-logs");
  cluster = await startShards(dir, 1, { args: ["--log-format=json"] });
});
afterAll(async () => {
  for (const s of cluster?.shards ?? []) await s.stop();
  await collector?.close();
});

describe("--log-format json", () => {
  it("gateway and shard write only JSON lines; a request's line has its fields and trace id", async () => {
    const gateway = await startGatewayProcess({
      modelDir: dir,
      planPath: cluster.planPath,
      namespace: "test",
      modelName: cluster.modelName,
      args: ["--log-format=json", "--log-requests", `--otlp-traces-endpoint=${collector.endpoint}`],
    });
    try {
      const traceId = randomBytes(16).toString("hex");
      const got = await gateway.client.chat.completions.create(
        { model: "tiny", messages: [{ role: "user", content: "Hello!" }], max_tokens: 3 },
        {
          headers: {
            traceparent: `00-${traceId}-${randomBytes(8).toString("hex")}-01`,
            "x-request-id": "logs-1",
          },
        },
      );
      const line = await waitFor("the request's line", async () =>
        jsonLines(gateway.log()).find((l) => l["request_id"] === "logs-1"),
      );
      expect(line).toMatchObject({
        level: "info",
        component: "gateway",
        method: "POST",
        path: "/v1/chat/completions",
        status: 200,
        prompt_tokens: got.usage!.prompt_tokens,
        cached_tokens: 0,
        completion_tokens: got.usage!.completion_tokens,
        finish_reasons: [got.choices[0]!.finish_reason],
        trace_id: traceId,
      });
      expect(line["duration_ms"]).toBeGreaterThanOrEqual(0);
      expect(line["msg"]).toContain(`request logs-1 POST /v1/chat/completions 200`);
      expect(line["msg"]).toContain(` trace=${traceId}`);
      // The span with that trace id is at the collector: logs and traces meet.
      await collector.waitFor("the request's span", (spans) =>
        spans.find((s) => s.traceId === traceId && s.attributes["gen_ai.request.id"] === "logs-1"),
      );
      const all = jsonLines(gateway.log());
      expect(all.every((l) => l["component"] === "gateway" && typeof l["time"] === "string")).toBe(
        true,
      );
      expect(all.some((l) => String(l["msg"]).startsWith("serving 'tiny'"))).toBe(true);
      const shard = jsonLines(cluster.shards[0]!.tail(1000));
      expect(shard.length).toBeGreaterThan(0);
      expect(shard.every((l) => l["component"] === "shard" && l["instance"] === "r0")).toBe(true);
    } finally {
      await gateway.process.stop();
    }
  });

  it("a command that fails writes its failure as JSON, with its code", async () => {
    const run = await runCli(process.execPath, [mainTs, "gateway", "--log-format=json", "--local"]);
    expect(run.code).not.toBe(0);
    const last = jsonLines(run.stderr).at(-1)!;
    expect(last).toMatchObject({ level: "error", component: "gateway", code: "EM_CLI_USAGE" });
    expect(last["msg"]).toContain("--model is required");
    // EXPERTMESH_LOG_FORMAT, for processes whose flags a chart sets.
    const env = await runCli(process.execPath, [mainTs, "shard"], undefined, {
      ...process.env,
      EXPERTMESH_LOG_FORMAT: "json",
    });
    expect(jsonLines(env.stderr).at(-1)).toMatchObject({
      component: "shard",
      code: "EM_CLI_USAGE",
    });
  });

  it.each(["gateway", "shard", "operator"])("%s refuses a format it does not know", async (cmd) => {
    const run = await runCli(process.execPath, [mainTs, cmd, "--log-format=xml"]);
    expect(run.code).not.toBe(0);
    expect(run.stderr).toContain("EM_CLI_USAGE");
  });
});
