// OpenTelemetry traces (src/gateway/tracing.ts, ADR 0030) into a real OpenTelemetry Collector
// (built by test/env/provision.sh), which forwards what it accepted to the test as OTLP JSON:
// a span per request over HTTP (the official openai client) and gRPC, a child of the caller's
// W3C traceparent, with the GenAI attributes matching the answer's usage; and across a
// disaggregated pair of gateway processes, the prefill gateway's span in the same trace.
import { randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import { type ClientReadableStream, credentials, Metadata } from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type GrpcGateway, startGrpcGateway } from "../../src/gateway/grpc.ts";
import { Tracing } from "../../src/gateway/tracing.ts";
import { runCli } from "../support/cli.ts";
import { uniqueName, waitFor } from "../support/env.ts";
import { startDisaggregatedPair, startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { GenerationClient, InferenceClient } from "../support/grpc.ts";
import { type Collector, type ReceivedSpan, startCollector } from "../support/otelcol.ts";
import { holdable, startGateway, type TestGateway } from "./helpers.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const hex = (bytes: number) => randomBytes(bytes).toString("hex");
/** A caller's span: W3C traceparent, sampled. */
const caller = () => {
  const traceId = hex(16);
  const spanId = hex(8);
  return { traceId, spanId, traceparent: `00-${traceId}-${spanId}-01` };
};
const inTrace = (traceId: string) => (spans: ReceivedSpan[]) => {
  const found = spans.filter((s) => s.traceId === traceId);
  return found.length > 0 ? found : undefined;
};

let dir: string;
let collector: Collector;
let tracing: Tracing;
let gw: TestGateway;
let grpc: GrpcGateway;
beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  collector = await startCollector(uniqueName("otelcol"));
  tracing = new Tracing({
    url: `${collector.endpoint}/v1/traces`,
    serviceName: "expertmesh-gateway",
    resource: { "service.instance.id": "test-gateway" },
    exportDelayMs: 100,
  });
  gw = await startGateway(dir, { tracing });
  grpc = await startGrpcGateway({ ctx: gw.ctx }, { port: 0, host: "127.0.0.1" });
});
afterAll(async () => {
  await grpc?.close();
  await gw?.close();
  await tracing?.shutdown();
  await collector?.close();
});

describe("request spans", () => {
  it("a chat request's span is a child of the caller's, with its usage and latencies", async () => {
    const c = caller();
    const { data: got, response } = await gw.client.chat.completions
      .create(
        {
          model: "tiny",
          messages: [{ role: "user", content: "Hello there, how are you?" }],
          max_tokens: 6,
          temperature: 0.5,
          top_p: 0.9,
        },
        { headers: { traceparent: c.traceparent, "x-request-id": "req-chat-1" } },
      )
      .withResponse();
    const [span] = await collector.waitFor("the chat span", inTrace(c.traceId));
    // W3C traceresponse: the trace and the gateway's span, sampled.
    expect(response.headers.get("traceresponse")).toBe(`00-${c.traceId}-${span!.spanId}-01`);
    expect(span).toMatchObject({
      name: "chat tiny",
      kind: 2, // SERVER
      parentSpanId: c.spanId,
      status: { code: 0 },
    });
    expect(span!.attributes).toMatchObject({
      "gen_ai.operation.name": "chat",
      "gen_ai.request.model": "tiny",
      "gen_ai.response.model": "tiny",
      "gen_ai.request.id": "req-chat-1",
      "gen_ai.request.max_tokens": 6,
      "gen_ai.request.temperature": 0.5,
      "gen_ai.request.top_p": expect.closeTo(0.9, 5),
      "gen_ai.usage.input_tokens": got.usage!.prompt_tokens,
      "gen_ai.usage.output_tokens": got.usage!.completion_tokens,
      "gen_ai.usage.cache_read.input_tokens": 0,
      "gen_ai.response.finish_reasons": [got.choices[0]!.finish_reason],
      "http.route": "/v1/chat/completions",
      "http.request.method": "POST",
    });
    const a = span!.attributes;
    const e2e = a["gen_ai.latency.e2e"] as number;
    const ttft = a["gen_ai.latency.time_to_first_token"] as number;
    const queued = a["gen_ai.latency.time_in_queue"] as number;
    expect(queued).toBeGreaterThanOrEqual(0);
    expect(ttft).toBeGreaterThanOrEqual(queued);
    expect(e2e).toBeGreaterThanOrEqual(ttft);
    // The span lasts the request: at least its e2e (which starts later, after the body).
    expect(Number(span!.endNs - span!.startNs) / 1e9).toBeGreaterThanOrEqual(e2e - 0.002);
    expect(span!.resource).toMatchObject({
      "service.name": "expertmesh-gateway",
      "service.instance.id": "test-gateway",
    });
  });

  it("a streamed completion without a caller starts its own trace; its second run reads the cache", async () => {
    const prompt = "The quick brown fox jumps over the lazy dog and then";
    const traceResponses: (string | null)[] = [];
    const run = async () => {
      const before = collector.spans.length;
      const { data: stream, response } = await gw.client.completions
        .create({ model: "tiny", prompt, max_tokens: 5, stream: true, temperature: 0 })
        .withResponse();
      traceResponses.push(response.headers.get("traceresponse"));
      for await (const _ of stream);
      return collector.waitFor("the completion span", (spans) =>
        spans.slice(before).find((s) => s.attributes["http.route"] === "/v1/completions"),
      );
    };
    const first = await run();
    expect(first.name).toBe("text_completion tiny");
    // A stream's headers carry it too, though the client sent no trace of its own.
    expect(traceResponses.at(-1)).toBe(`00-${first.traceId}-${first.spanId}-01`);
    expect(first.parentSpanId).toBe("");
    expect(first.attributes).toMatchObject({
      "gen_ai.operation.name": "text_completion",
      "gen_ai.usage.output_tokens": 5,
      "gen_ai.response.finish_reasons": ["length"],
      "gen_ai.usage.cache_read.input_tokens": 0,
    });
    const second = await run();
    expect(second.traceId).not.toBe(first.traceId);
    expect(second.attributes["gen_ai.usage.cache_read.input_tokens"]).toBeGreaterThan(0);
  });

  // Greedy (temperature 0): a sampled reply can end at end-of-sequence before its 3 tokens.
  it.each<[string, string, Record<string, unknown>, string]>([
    [
      "/v1/messages",
      "chat",
      { model: "tiny", max_tokens: 3, temperature: 0, messages: [{ role: "user", content: "Hi" }] },
      "/v1/messages",
    ],
    [
      "/v1/responses",
      "chat",
      { model: "tiny", input: "Hi", max_output_tokens: 3, temperature: 0 },
      "/v1/responses",
    ],
    [
      "/v2/models/tiny/infer",
      "text_completion",
      {
        inputs: [{ name: "text_input", datatype: "BYTES", shape: [1, 1], data: [["Hi"]] }],
        parameters: { max_tokens: 3, temperature: 0 },
      },
      "/v2/models/:name/infer",
    ],
    [
      "/v2/models/tiny/generate",
      "text_completion",
      { text_input: "Hi", parameters: { max_tokens: 3, temperature: 0 } },
      "/v2/models/:name/generate",
    ],
  ])("POST %s is traced as %s", async (path, operation, body, route) => {
    const c = caller();
    const r = await fetch(`${gw.url}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json", traceparent: c.traceparent },
      body: JSON.stringify(body),
    });
    expect(r.status).toBe(200);
    await r.text();
    const [span] = await collector.waitFor(`the ${path} span`, inTrace(c.traceId));
    expect(span).toMatchObject({ name: `${operation} tiny`, parentSpanId: c.spanId });
    expect(span!.attributes).toMatchObject({
      "gen_ai.operation.name": operation,
      "http.route": route,
      "gen_ai.usage.output_tokens": 3,
    });
    expect(r.headers.get("traceresponse")).toBe(`00-${c.traceId}-${span!.spanId}-01`);
  });

  it("a client that leaves mid-stream: the span ends with finish reason abort", async () => {
    const c = caller();
    const controller = new AbortController();
    const stream = await gw.client.completions.create(
      {
        model: "tiny",
        prompt: "Count with me:",
        max_tokens: 200,
        stream: true,
        ignore_eos: true,
      } as never,
      { headers: { traceparent: c.traceparent }, signal: controller.signal },
    );
    try {
      for await (const _ of stream as unknown as AsyncIterable<unknown>) controller.abort();
    } catch {}
    const [span] = await collector.waitFor("the aborted span", inTrace(c.traceId));
    expect(span!.attributes["gen_ai.response.finish_reasons"]).toEqual(["abort"]);
    expect(span!.attributes["gen_ai.usage.output_tokens"]).toBeLessThan(200);
  });

  it("a request refused at admission is a span with status error and its code", async () => {
    // One request held in its step, one waiting: the queue (depth 1) is full.
    let hold: ReturnType<typeof holdable> | null = null;
    const full = await startGateway(dir, {
      tracing,
      maxQueueDepth: 1,
      wrap: (inner) => {
        hold = holdable(inner);
        return hold.runner;
      },
    });
    const held = hold! as ReturnType<typeof holdable>;
    held.hold();
    const ask = () =>
      full.client.completions.create({ model: "tiny", prompt: "Hi", max_tokens: 2 });
    const running = ask();
    await held.entered;
    const waiting = ask();
    await waitFor("one waiting", async () =>
      full.ctx.engine.stats.numWaiting === 1 ? true : undefined,
    );
    try {
      const c = caller();
      await expect(
        full.client.completions.create(
          { model: "tiny", prompt: "Hi", max_tokens: 4 },
          { headers: { traceparent: c.traceparent } },
        ),
      ).rejects.toMatchObject({ status: 429 });
      const [span] = await collector.waitFor("the refused span", inTrace(c.traceId));
      expect(span!.status.code).toBe(2); // ERROR
      expect(span!.attributes["error.type"]).toBe("EM_GATEWAY_OVERLOADED");
      expect(span!.attributes["gen_ai.usage.output_tokens"]).toBe(0);
    } finally {
      held.release();
      await Promise.all([running, waiting]);
      await full.close();
    }
  });

  it("a request refused before any job (bad body, wrong content type, a model not served, no API key) still has its span, with the code, and its answer the traceresponse", async () => {
    const send = async (path: string, body: string, contentType = "application/json") => {
      const c = caller();
      const r = await fetch(`${gw.url}${path}`, {
        method: "POST",
        headers: {
          "content-type": contentType,
          traceparent: c.traceparent,
          "x-request-id": `refused-${c.spanId}`,
        },
        body,
      });
      await r.text();
      const [span] = await collector.waitFor(`the span of ${path}`, inTrace(c.traceId));
      expect(span!.parentSpanId).toBe(c.spanId);
      expect(span!.kind).toBe(2); // SERVER
      expect(span!.status.code).toBe(2); // ERROR
      expect(span!.attributes["gen_ai.request.id"]).toBe(`refused-${c.spanId}`);
      expect(span!.attributes["http.response.status_code"]).toBe(r.status);
      expect(r.headers.get("traceresponse")).toBe(`00-${c.traceId}-${span!.spanId}-01`);
      return { status: r.status, span: span! };
    };
    const bad = await send(
      "/v1/chat/completions",
      JSON.stringify({ model: "tiny", messages: "not a list" }),
    );
    expect(bad.status).toBe(400);
    expect(bad.span.name).toBe("chat tiny");
    expect(bad.span.attributes["error.type"]).toBe("EM_GATEWAY_BAD_REQUEST");
    expect(bad.span.attributes["http.route"]).toBe("/v1/chat/completions");
    const type = await send("/v1/completions", "prompt=hi", "application/x-www-form-urlencoded");
    expect(type.status).toBe(415);
    expect(type.span.name).toBe("text_completion"); // the body was never read: no model
    expect(type.span.attributes["error.type"]).toBe("EM_GATEWAY_BAD_REQUEST");
    const other = await send(
      "/v1/chat/completions",
      JSON.stringify({ model: "gpt-x", messages: [{ role: "user", content: "hi" }] }),
    );
    expect(other.status).toBe(404);
    expect(other.span.name).toBe("chat gpt-x");
    expect(other.span.attributes["error.type"]).toBe("EM_GATEWAY_UNKNOWN_MODEL");
    // A missing API key: refused in the first hook, before the body is read.
    const keyed = await startGateway(dir, { tracing, apiKeys: ["k-1"] });
    try {
      const k = caller();
      const r = await fetch(`${keyed.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", traceparent: k.traceparent },
        body: JSON.stringify({ model: "tiny", messages: [{ role: "user", content: "hi" }] }),
      });
      expect(r.status).toBe(401);
      const [span] = await collector.waitFor("the unauthorized span", inTrace(k.traceId));
      expect(span!.attributes["error.type"]).toBe("EM_GATEWAY_UNAUTHORIZED");
      expect(r.headers.get("traceresponse")).toBe(`00-${k.traceId}-${span!.spanId}-01`);
    } finally {
      await keyed.close();
    }
    // A route that runs no generation gets no span, refused or not.
    const c = caller();
    const r = await fetch(`${gw.url}/tokenize`, {
      method: "POST",
      headers: { "content-type": "application/json", traceparent: c.traceparent },
      body: "{",
    });
    expect(r.status).toBe(400);
    expect(r.headers.get("traceresponse")).toBeNull();
    await tracing.flush();
    expect(collector.spans.filter((s) => s.traceId === c.traceId)).toEqual([]);
  });

  it("OpenMetrics scrapes get the trace id as the latency histograms' exemplar; plain ones do not", async () => {
    const c = caller();
    // ignore_eos: a first sampled token that ends the request is no first token (no TTFT
    // observation, so no exemplar); the random tiny model sometimes samples it (CI at face231).
    await gw.client.completions.create(
      { model: "tiny", prompt: "An exemplar, please:", max_tokens: 3, ignore_eos: true } as never,
      { headers: { traceparent: c.traceparent } },
    );
    const scrape = async (accept?: string) => {
      const r = await fetch(`${gw.url}/metrics`, accept ? { headers: { accept } } : {});
      return { type: r.headers.get("content-type") ?? "", text: await r.text() };
    };
    // What Prometheus sends: OpenMetrics first.
    const om = await scrape(
      "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    );
    expect(om.type).toContain("application/openmetrics-text");
    expect(om.text.trimEnd().endsWith("# EOF")).toBe(true);
    for (const h of ["time_to_first_token_seconds", "e2e_request_latency_seconds"])
      expect(om.text).toMatch(
        new RegExp(
          `^expertmesh_gateway_${h}_bucket\\{le="[^"]+"\\} \\d+ # \\{trace_id="${c.traceId}"\\} [\\d.e-]+ \\d+(\\.\\d+)?$`,
          "m",
        ),
      );
    const plain = await scrape();
    expect(plain.type).toContain("text/plain");
    expect(plain.text).not.toContain("trace_id=");
    expect(plain.text).toMatch(/^expertmesh_gateway_time_to_first_token_seconds_count \d+$/m);
  });

  it("a gRPC ChatStream call's span is a child of the traceparent in its metadata", async () => {
    const c = caller();
    const client = new GenerationClient(`127.0.0.1:${grpc.port}`, credentials.createInsecure());
    const md = new Metadata();
    md.set("traceparent", c.traceparent);
    let answered: unknown;
    await new Promise<void>((resolve, reject) => {
      const s: ClientReadableStream<any> = (client as any).ChatStream(
        // (greedy: sampled, the answer may end before its 4 tokens)
        {
          model: "tiny",
          messages: [{ role: "user", content: "Hi!" }],
          max_tokens: 4,
          temperature: 0,
        },
        md,
      );
      s.on("metadata", (m: Metadata) => {
        answered = m.get("traceresponse")[0];
      });
      s.on("data", () => {});
      s.on("error", reject);
      s.on("end", resolve);
    });
    client.close();
    const [span] = await collector.waitFor("the gRPC span", inTrace(c.traceId));
    expect(span).toMatchObject({ name: "chat tiny", parentSpanId: c.spanId });
    expect(answered).toBe(`00-${c.traceId}-${span!.spanId}-01`);
    expect(span!.attributes).toMatchObject({
      "rpc.system": "grpc",
      "rpc.method": "/expertmesh.v1.Generation/ChatStream",
      "gen_ai.usage.output_tokens": 4,
    });
  });

  it("a gRPC call refused before its job has its span too, and the traceresponse in its trailers", async () => {
    const client = new GenerationClient(`127.0.0.1:${grpc.port}`, credentials.createInsecure());
    const c = caller();
    const md = new Metadata();
    md.set("traceparent", c.traceparent);
    md.set("x-request-id", "grpc-refused");
    const failed = await new Promise<{ code: number; metadata: Metadata }>((resolve, reject) => {
      const s: ClientReadableStream<any> = (client as any).ChatStream(
        { model: "gpt-x", messages: [{ role: "user", content: "Hi!" }], max_tokens: 4 },
        md,
      );
      s.on("data", () => {});
      s.on("error", (e: { code: number; metadata: Metadata }) => resolve(e));
      s.on("end", () => reject(new Error("the call succeeded")));
    });
    client.close();
    expect(failed.code).toBe(5); // NOT_FOUND
    const [span] = await collector.waitFor("the refused gRPC span", inTrace(c.traceId));
    expect(span).toMatchObject({ name: "chat gpt-x", parentSpanId: c.spanId, kind: 2 });
    expect(span!.status.code).toBe(2);
    expect(span!.attributes).toMatchObject({
      "rpc.system": "grpc",
      "rpc.method": "/expertmesh.v1.Generation/ChatStream",
      "rpc.grpc.status_code": 5,
      "error.type": "EM_GATEWAY_UNKNOWN_MODEL",
      "gen_ai.request.id": "grpc-refused",
    });
    expect(failed.metadata.get("traceresponse")[0]).toBe(`00-${c.traceId}-${span!.spanId}-01`);
    // A call that ran its job has the job's span only: one span, not two.
    const d = caller();
    const md2 = new Metadata();
    md2.set("traceparent", d.traceparent);
    const client2 = new GenerationClient(`127.0.0.1:${grpc.port}`, credentials.createInsecure());
    await new Promise<void>((resolve) => {
      const s: ClientReadableStream<any> = (client2 as any).ChatStream(
        { model: "tiny", messages: [{ role: "user", content: "Hi!" }], max_tokens: 2 },
        md2,
      );
      s.on("data", () => {});
      s.on("error", () => resolve());
      s.on("end", () => resolve());
    });
    client2.close();
    await collector.waitFor("the job's span", inTrace(d.traceId));
    await tracing.flush();
    expect(collector.spans.filter((s) => s.traceId === d.traceId)).toHaveLength(1);
  });

  it("ModelStreamInfer: a span per message, a message refused before its job included, each named in its last response", async () => {
    const client = new InferenceClient(`127.0.0.1:${grpc.port}`, credentials.createInsecure());
    const c = caller();
    const md = new Metadata();
    md.set("traceparent", c.traceparent);
    const input = (text: string) => ({
      name: "text_input",
      datatype: "BYTES",
      shape: [1],
      contents: { bytes_contents: [Buffer.from(text)] },
    });
    const messages: any[] = [];
    await new Promise<void>((resolve, reject) => {
      const s = (client as any).ModelStreamInfer(md);
      s.on("data", (m: any) => messages.push(m));
      s.on("error", reject);
      s.on("end", resolve);
      s.write({
        model_name: "tiny",
        id: "good",
        inputs: [input("Hi")],
        parameters: { max_tokens: { int64_param: 2 } },
      });
      s.write({ model_name: "gpt-x", id: "bad", inputs: [input("Hi")] });
      s.end();
    });
    client.close();
    expect(messages.some((m) => m.error_message?.startsWith("EM_GATEWAY_UNKNOWN_MODEL"))).toBe(
      true,
    );
    const spans = await collector.waitFor("both messages' spans", (all) => {
      const found = all.filter((s) => s.traceId === c.traceId);
      return found.length === 2 ? found : undefined;
    });
    const byName = Object.fromEntries(spans.map((s) => [s.name, s]));
    expect(byName["text_completion tiny"]!.status.code).not.toBe(2);
    expect(byName["text_completion gpt-x"]!.attributes).toMatchObject({
      "error.type": "EM_GATEWAY_UNKNOWN_MODEL",
      "rpc.method": "/inference.GRPCInferenceService/ModelStreamInfer",
    });
    for (const span of spans) expect(span.parentSpanId).toBe(c.spanId);
    // Each message's last response names its own span (the stream's metadata cannot).
    const traceresponse = (id: string) =>
      messages.filter((m) => m.infer_response.id === id).at(-1).infer_response.parameters
        .traceresponse?.string_param;
    expect(traceresponse("good")).toBe(
      `00-${c.traceId}-${byName["text_completion tiny"]!.spanId}-01`,
    );
    expect(traceresponse("bad")).toBe(
      `00-${c.traceId}-${byName["text_completion gpt-x"]!.spanId}-01`,
    );
  });
});

describe("gateway processes with --otlp-traces-endpoint", () => {
  it("a prompt a prefill gateway computes: its job's span joins the request's trace", async () => {
    const bucket = uniqueName("trace").replace(/[^A-Za-z0-9_-]/g, "_");
    const modelName = uniqueName("traced");
    const { decode, prefill } = await startDisaggregatedPair({
      modelDir: dir,
      modelName,
      bucket,
      blockSize: 4,
      minTokens: 16,
      args: [`--otlp-traces-endpoint=${collector.endpoint}`],
    });
    try {
      const c = caller();
      const got = await decode.client.completions.create(
        {
          model: "tiny",
          prompt: "In a quiet village by the sea, an old sailor said that the tide would turn",
          max_tokens: 4,
          temperature: 0,
        },
        { headers: { traceparent: c.traceparent } },
      );
      expect(got.usage!.prompt_tokens_details?.cached_tokens).toBeGreaterThan(0);
      const spans = await collector.waitFor("both gateways' spans", (all) => {
        const found = all.filter((s) => s.traceId === c.traceId);
        return found.length >= 2 ? found : undefined;
      });
      const request = spans.find((s) => s.name === "text_completion tiny")!;
      const job = spans.find((s) => s.name === "prefill_job")!;
      expect(request.parentSpanId).toBe(c.spanId);
      expect(request.resource).toMatchObject({
        "service.name": "expertmesh-gateway",
        "expertmesh.role": "gateway",
      });
      expect(request.events).toContainEqual({
        name: "prefill_remote",
        attributes: expect.objectContaining({ "expertmesh.prefill.outcome": "done" }),
      });
      // The job's span: a child of the request's, at the prefill gateway, inside its time.
      expect(job.parentSpanId).toBe(request.spanId);
      expect(job.resource).toMatchObject({
        "service.name": "expertmesh-prefill",
        "expertmesh.role": "prefill",
      });
      expect(job.attributes).toMatchObject({
        "expertmesh.prefill.prompt_tokens": got.usage!.prompt_tokens,
      });
      expect(job.attributes["expertmesh.prefill.shared_blocks"]).toBeGreaterThan(0);
      expect(job.startNs).toBeGreaterThanOrEqual(request.startNs);
      expect(job.endNs).toBeLessThanOrEqual(request.endNs);
      expect(decode.log()).toContain("OpenTelemetry traces to");
    } finally {
      await Promise.all([decode.process.stop(), prefill.process.stop()]);
    }
  });

  it("a sample ratio of 0 traces no new request but follows a sampled caller", async () => {
    const gateway = await startGatewayProcess({
      modelDir: dir,
      namespace: "test",
      modelName: uniqueName("sampled"),
      args: [
        `--otlp-traces-endpoint=${collector.endpoint}/v1/traces`,
        "--otlp-traces-sample-ratio=0",
      ],
    });
    try {
      const ask = (headers: Record<string, string>) =>
        gateway.client.completions.create(
          { model: "tiny", prompt: "Hello", max_tokens: 2 },
          { headers },
        );
      const unsampled = caller();
      // Not sampled upstream (flags 00): not here either.
      await ask({
        traceparent: unsampled.traceparent.replace(/-01$/, "-00"),
        "x-request-id": "r-unsampled",
      });
      await ask({ "x-request-id": "r-root" });
      const sampled = caller();
      await ask({ traceparent: sampled.traceparent });
      const [span] = await collector.waitFor("the sampled caller's span", inTrace(sampled.traceId));
      expect(span!.parentSpanId).toBe(sampled.spanId);
      // Spans go out in batches after 1 s: those of the first two would be there by now.
      await new Promise((r) => setTimeout(r, 1500));
      const ids = collector.spans.map((s) => s.attributes["gen_ai.request.id"]);
      expect(ids).not.toContain("r-unsampled");
      expect(ids).not.toContain("r-root");
    } finally {
      await gateway.process.stop();
    }
  });

  it("over OTLP/gRPC, by the flag or by OpenTelemetry's variables: the same span at the collector's gRPC receiver", async () => {
    const viaFlag = await startGatewayProcess({
      modelDir: dir,
      namespace: "test",
      modelName: uniqueName("grpcflag"),
      args: [`--otlp-traces-endpoint=${collector.grpcEndpoint}`, "--otlp-traces-protocol=grpc"],
    });
    const viaEnv = await startGatewayProcess({
      modelDir: dir,
      namespace: "test",
      modelName: uniqueName("grpcenv"),
      env: {
        ...process.env,
        OTEL_EXPORTER_OTLP_ENDPOINT: collector.grpcEndpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL: "grpc",
        OTEL_SERVICE_NAME: "gw-over-grpc",
      },
    });
    try {
      expect(viaFlag.log()).toContain(
        `OpenTelemetry traces to ${collector.grpcEndpoint} (OTLP/gRPC)`,
      );
      expect(viaEnv.log()).toContain(
        "OpenTelemetry traces to the OTEL_EXPORTER_OTLP_* endpoint (OTLP/gRPC)",
      );
      for (const [gateway, service] of [
        [viaFlag, "expertmesh-gateway"],
        [viaEnv, "gw-over-grpc"],
      ] as const) {
        const c = caller();
        const got = await gateway.client.completions.create(
          { model: "tiny", prompt: "Hello", max_tokens: 3 },
          { headers: { traceparent: c.traceparent } },
        );
        const [span] = await collector.waitFor(`the span from ${service}`, inTrace(c.traceId));
        expect(span!.parentSpanId).toBe(c.spanId);
        expect(span!.name).toBe("text_completion tiny");
        expect(span!.attributes["gen_ai.usage.output_tokens"]).toBe(got.usage!.completion_tokens);
        expect(span!.resource["service.name"]).toBe(service);
      }
    } finally {
      await viaFlag.process.stop();
      await viaEnv.process.stop();
    }
  });

  it("a collector that is not there costs the spans, never a request; the gateway says so", async () => {
    const gateway = await startGatewayProcess({
      modelDir: dir,
      namespace: "test",
      modelName: uniqueName("nocollector"),
      args: ["--otlp-traces-endpoint=http://127.0.0.1:1"],
    });
    try {
      for (let i = 0; i < 3; i++) {
        const got = await gateway.client.completions.create({
          model: "tiny",
          prompt: `Hello ${i}`,
          max_tokens: 2,
          // Sampled: the tiny model may pick its end-of-sequence token first.
          ...({ ignore_eos: true } as object),
        });
        expect(got.usage!.completion_tokens).toBe(2);
      }
      await waitFor("the export failure logged", async () =>
        /traces not sent to http:\/\/127\.0\.0\.1:1\/v1\/traces \(\d+ failures? since the last line\)/.test(
          gateway.log(),
        )
          ? true
          : undefined,
      );
    } finally {
      await gateway.process.stop();
    }
  });

  it.each([
    [["--otlp-traces-endpoint=grpc://collector:4317"], "an http:// or https:// URL"],
    [["--otlp-traces-endpoint=not a url"], "must be an http(s) URL"],
    [["--otlp-traces-endpoint=http://c:4318", "--otlp-traces-sample-ratio=2"], "between 0 and 1"],
    [["--otlp-traces-sample-ratio=0.5"], "needs --otlp-traces-endpoint"],
    [["--otlp-traces-protocol=grpc"], "needs --otlp-traces-endpoint"],
    [
      ["--otlp-traces-endpoint=http://c:4317", "--otlp-traces-protocol=http/json"],
      "--otlp-traces-protocol must be grpc or http/protobuf, got 'http/json' (OTLP's JSON encoding is not offered)",
    ],
    [
      ["--otlp-traces-endpoint=http://c:4317/v1/traces", "--otlp-traces-protocol=grpc"],
      "over gRPC is a server's address without a path",
    ],
  ])("refuses %j", async (flags, message) => {
    const run = await runCli(
      process.execPath,
      [mainTs, "gateway", `--model=${dir}`, "--local", ...flags],
      undefined,
      { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: "", OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "" },
    );
    expect(run.code).not.toBe(0);
    expect(run.stderr).toContain("EM_CLI_USAGE");
    expect(run.stderr).toContain(message);
  });
});
