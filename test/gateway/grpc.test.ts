// The gateway's gRPC port against a real @grpc/grpc-js client: KServe v2
// (inference.GRPCInferenceService) and expertmesh.v1.Generation/GenerateStream, on the
// engine of a gateway started in this process on the tiny V3 checkpoint. Greedy decoding
// makes the gRPC text comparable with /v1/completions.
import {
  type Client,
  type ClientReadableStream,
  credentials,
  Metadata,
  type ServiceError,
  status,
} from "@grpc/grpc-js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { ExpertRunner } from "../../src/engine/experts.ts";
import { type GrpcGateway, grpcStatus, startGrpcGateway } from "../../src/gateway/grpc.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { waitFor } from "../support/env.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { GenerationClient, InferenceClient } from "../support/grpc.ts";
import { finishedRequests, holdable, metric, startGateway, type TestGateway } from "./helpers.ts";

const inference = InferenceClient;
const generation = GenerationClient;

interface Clients {
  kserve: Client;
  gen: Client;
}

function clients(port: number): Clients {
  const addr = `127.0.0.1:${port}`;
  return {
    kserve: new inference(addr, credentials.createInsecure()),
    gen: new generation(addr, credentials.createInsecure()),
  };
}

/** A unary call as a promise. */
function call<T = any>(
  client: Client,
  method: string,
  req: unknown,
  md: Metadata = new Metadata(),
): Promise<T> {
  return new Promise((resolve, reject) =>
    (client as any)[method](req, md, (err: ServiceError | null, res: T) =>
      err ? reject(err) : resolve(res),
    ),
  );
}

/** A unary call's error (fails the test when it succeeds). */
async function callError(
  client: Client,
  method: string,
  req: unknown,
  md?: Metadata,
): Promise<ServiceError> {
  const r = await call(client, method, req, md).then(
    (res) => ({ ok: true as const, res }),
    (err: ServiceError) => ({ ok: false as const, err }),
  );
  if (r.ok) throw new Error(`${method} succeeded: ${JSON.stringify(r.res)}`);
  return r.err;
}

interface StreamResult {
  messages: any[];
  error: ServiceError | null;
}

/** Reads a GenerateStream to its end (messages, then the status if not OK). */
function generate(
  c: Clients,
  req: unknown,
  onMessage?: (m: any, s: ClientReadableStream<any>) => void,
): Promise<StreamResult> {
  return new Promise((resolve) => {
    const messages: any[] = [];
    const s: ClientReadableStream<any> = (c.gen as any).GenerateStream(req);
    s.on("data", (m: any) => {
      messages.push(m);
      onMessage?.(m, s);
    });
    s.on("error", (error: ServiceError) => resolve({ messages, error }));
    s.on("end", () => resolve({ messages, error: null }));
  });
}

const bytesInput = (text: string | string[], shape = [1]) => ({
  name: "text_input",
  datatype: "BYTES",
  shape,
  contents: { bytes_contents: (Array.isArray(text) ? text : [text]).map((t) => Buffer.from(t)) },
});

const param = {
  int: (v: number | string) => ({ int64_param: v }),
  dbl: (v: number) => ({ double_param: v }),
  str: (v: string) => ({ string_param: v }),
  bool: (v: boolean) => ({ bool_param: v }),
};

const inferRequest = (text: string, parameters: Record<string, unknown> = {}, extra = {}) => ({
  model_name: "tiny",
  inputs: [bytesInput(text)],
  parameters,
  ...extra,
});

/**
 * The elements of output `name` (text_output unless named), from contents or raw contents
 * (4-byte length, then bytes; one raw content per output, in the outputs' order).
 */
const outputTexts = (res: any, name = "text_output"): string[] => {
  const i = res.outputs.findIndex((o: { name: string }) => o.name === name);
  expect(i, `output ${name}`).toBeGreaterThanOrEqual(0);
  const out = res.outputs[i];
  expect(out.datatype).toBe("BYTES");
  if (res.raw_output_contents.length > 0) {
    expect(res.raw_output_contents).toHaveLength(res.outputs.length);
    const raw: Buffer = res.raw_output_contents[i];
    const texts: string[] = [];
    for (let at = 0; at < raw.length; ) {
      const n = raw.readUInt32LE(at);
      texts.push(raw.subarray(at + 4, at + 4 + n).toString("utf8"));
      at += 4 + n;
    }
    return texts;
  }
  return out.contents.bytes_contents.map((b: Buffer) => b.toString("utf8"));
};

const outputText = (res: any): string => {
  expect(res.outputs[0].shape.reduce((a: number, d: number) => a * d, 1)).toBe(1);
  const texts = outputTexts(res);
  expect(texts).toHaveLength(1);
  return texts[0]!;
};

const trailer = (err: ServiceError, key: string) => err.metadata?.get(key)[0];

let dir: string;
let gw: TestGateway;
let grpc: GrpcGateway;
let c: Clients;

beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  gw = await startGateway(dir, { maxBatchTokens: 24 });
  grpc = await startGrpcGateway({ ctx: gw.ctx }, { port: 0, host: "127.0.0.1" });
  c = clients(grpc.port);
});
afterAll(async () => {
  c?.kserve.close();
  c?.gen.close();
  await grpc?.close();
  await gw?.close();
});

describe("KServe v2 health and metadata", () => {
  it("is live and ready; the served model is ready", async () => {
    expect(await call(c.kserve, "ServerLive", {})).toEqual({ live: true });
    expect(await call(c.kserve, "ServerReady", {})).toEqual({ ready: true });
    expect(await call(c.kserve, "ModelReady", { name: "tiny" })).toEqual({ ready: true });
    expect(await call(c.kserve, "ModelReady", { name: "tiny", version: "1" })).toEqual({
      ready: true,
    });
    const meta = await call(c.kserve, "ServerMetadata", {});
    expect(meta.name).toBe("expertmesh");
    expect(meta.version).toMatch(/^\d+\.\d+\.\d+/);
  });

  it("describes the model: one BYTES input text_input, BYTES outputs text_output and finish_reason", async () => {
    expect(await call(c.kserve, "ModelMetadata", { name: "tiny" })).toEqual({
      name: "tiny",
      versions: ["1"],
      platform: "expertmesh",
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [-1] }],
      outputs: [
        { name: "text_output", datatype: "BYTES", shape: [-1] },
        { name: "finish_reason", datatype: "BYTES", shape: [-1] },
      ],
    });
  });

  it("an unknown model or version: NOT_FOUND", async () => {
    for (const [method, req] of [
      ["ModelReady", { name: "gpt-4" }],
      ["ModelMetadata", { name: "gpt-4" }],
      ["ModelMetadata", { name: "tiny", version: "7" }],
    ] as const) {
      const err = await callError(c.kserve, method, req);
      expect(err.code).toBe(status.NOT_FOUND);
      expect(trailer(err, "em-code")).toBe("EM_GATEWAY_UNKNOWN_MODEL");
    }
    // A message quoting a long request field is clipped: status travels in an HTTP/2
    // header, and ~90 KB of it made grpc-js drop the whole connection.
    const err = await callError(c.kserve, "ModelReady", { name: "m".repeat(200_000) });
    expect(err.code).toBe(status.NOT_FOUND);
    expect(err.details.length).toBeLessThan(1200);
    expect(err.details).toMatch(/more characters\)$/);
    expect((await call(c.kserve, "ServerLive", {})).live).toBe(true);
  });
});

describe("ModelInfer", () => {
  it("greedy: the same text and usage as /v1/completions for the same prompt", async () => {
    const prompt = "The quick brown fox";
    const [res, http] = await Promise.all([
      call(
        c.kserve,
        "ModelInfer",
        inferRequest(
          prompt,
          { max_tokens: param.int(12), temperature: param.dbl(0) },
          { id: "r1" },
        ),
      ),
      gw.client.completions.create({ model: "tiny", prompt, max_tokens: 12, temperature: 0 }),
    ]);
    expect(res.model_name).toBe("tiny");
    expect(res.model_version).toBe("1");
    expect(res.id).toBe("r1");
    expect(res.raw_output_contents).toEqual([]);
    expect(outputText(res)).toBe(http.choices[0]!.text);
    // No outputs named: both, text_output first.
    expect(res.outputs.map((o: { name: string }) => o.name)).toEqual([
      "text_output",
      "finish_reason",
    ]);
    expect(outputTexts(res, "finish_reason")).toEqual([http.choices[0]!.finish_reason]);
    expect(res.parameters).toEqual({
      finish_reason: {
        string_param: http.choices[0]!.finish_reason,
        parameter_choice: "string_param",
      },
      prompt_tokens: { int64_param: http.usage!.prompt_tokens, parameter_choice: "int64_param" },
      completion_tokens: {
        int64_param: http.usage!.completion_tokens,
        parameter_choice: "int64_param",
      },
    });
  });

  it("takes parameters as strings, the first BYTES input under any name, raw contents", async () => {
    const prompt = "Once upon a time";
    const base = await call(
      c.kserve,
      "ModelInfer",
      inferRequest(prompt, { max_tokens: param.int(8), temperature: param.dbl(0) }),
    );
    const text = outputText(base);
    const asStrings = await call(
      c.kserve,
      "ModelInfer",
      inferRequest(prompt, { max_tokens: param.str("8"), temperature: param.str("0") }),
    );
    expect(outputText(asStrings)).toBe(text);
    // A BYTES input with another name after a non-BYTES one; text_output asked for by name.
    const renamed = await call(c.kserve, "ModelInfer", {
      model_name: "tiny",
      inputs: [
        { name: "flag", datatype: "BOOL", shape: [1], contents: { bool_contents: [true] } },
        { ...bytesInput(prompt), name: "prompt" },
      ],
      outputs: [{ name: "text_output" }],
      parameters: { max_tokens: param.int(8), temperature: param.int(0) },
    });
    expect(outputText(renamed)).toBe(text);
    expect(renamed.outputs).toHaveLength(1);
    // Raw form (as Triton's client sends it): 4-byte little-endian length, then the bytes.
    const body = Buffer.from(prompt);
    const len = Buffer.alloc(4);
    len.writeUInt32LE(body.length);
    const raw = await call(c.kserve, "ModelInfer", {
      model_name: "tiny",
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [1, 1] }],
      raw_input_contents: [Buffer.concat([len, body])],
      parameters: { max_tokens: { uint64_param: 8 }, temperature: param.dbl(0) },
    });
    expect(raw.raw_output_contents).toHaveLength(2); // text_output, finish_reason
    expect(raw.outputs[0].contents).toBeUndefined();
    expect(raw.outputs[0].shape).toEqual([1, 1]);
    expect(outputText(raw)).toBe(text);
  });

  it("a batch of prompts: one answer each, in the input's shape, as each alone", async () => {
    const greedy = { max_tokens: param.int(6), temperature: param.dbl(0) };
    const prompts = ["The weather today", "Tell me", "Once upon a time"];
    const alone: string[] = [];
    for (const p of prompts)
      alone.push(outputText(await call(c.kserve, "ModelInfer", inferRequest(p, greedy))));
    const batch = await call(c.kserve, "ModelInfer", {
      model_name: "tiny",
      inputs: [bytesInput(prompts, [3, 1])],
      parameters: greedy,
    });
    expect(batch.outputs[0].shape).toEqual([3, 1]);
    expect(outputTexts(batch)).toEqual(alone);
    // Why each ended, element by element (and comma-separated in the parameter).
    expect(batch.outputs[1].shape).toEqual([3, 1]);
    const reasons = outputTexts(batch, "finish_reason");
    expect(reasons.join(",")).toBe(batch.parameters.finish_reason.string_param);
    // A stop that ends the second prompt's answer at once: "stop" there, "length" elsewhere.
    const first = alone[1]!.trim().split(/\s+/)[0]!;
    const stopped = await call(c.kserve, "ModelInfer", {
      model_name: "tiny",
      inputs: [bytesInput(prompts, [3])],
      outputs: [{ name: "finish_reason" }, { name: "text_output" }],
      parameters: { ...greedy, stop: param.str(first) },
    });
    expect(stopped.outputs.map((o: { name: string }) => o.name)).toEqual([
      "finish_reason",
      "text_output",
    ]);
    expect(outputTexts(stopped, "finish_reason")[1]).toBe("stop");
    expect(outputTexts(stopped, "finish_reason")).toEqual(
      outputTexts(stopped).map((t, i) => (t === alone[i] ? reasons[i] : "stop")),
    );
    expect(Number(batch.parameters.completion_tokens.int64_param)).toBeGreaterThan(3);
    // Raw contents: the elements one after the other, the answer raw too.
    const raw = await call(c.kserve, "ModelInfer", {
      model_name: "tiny",
      inputs: [{ name: "text_input", datatype: "BYTES", shape: [3] }],
      raw_input_contents: [
        Buffer.concat(
          prompts.flatMap((p) => {
            const len = Buffer.alloc(4);
            len.writeUInt32LE(Buffer.byteLength(p));
            return [len, Buffer.from(p)];
          }),
        ),
      ],
      parameters: greedy,
    });
    expect(raw.outputs[0].shape).toEqual([3]);
    expect(outputTexts(raw)).toEqual(alone);
    expect(outputTexts(raw, "finish_reason")).toEqual(reasons);
  });

  it("a seed repeats a sampled answer; the stream samples the same way", async () => {
    const parameters = {
      max_tokens: param.int(10),
      temperature: param.dbl(0.9),
      top_p: param.dbl(0.95),
      top_k: param.int(50),
      seed: param.int(1234),
    };
    const a = outputText(await call(c.kserve, "ModelInfer", inferRequest("Tell me", parameters)));
    const b = outputText(await call(c.kserve, "ModelInfer", inferRequest("Tell me", parameters)));
    expect(b).toBe(a);
    const s = await generate(c, {
      model: "tiny",
      prompt: "Tell me",
      max_tokens: 10,
      temperature: 0.9,
      top_p: 0.95,
      top_k: 50,
      seed: 1234,
    });
    expect(s.error).toBeNull();
    expect(s.messages.map((m) => m.text).join("")).toBe(a);
    // 64-bit seeds (past 2^53) are seeds too, as over HTTP.
    const big = await call(
      c.kserve,
      "ModelInfer",
      inferRequest("Tell me", { ...parameters, seed: param.int("9223372036854775807") }),
    );
    expect(outputText(big).length).toBeGreaterThan(0);
  });

  it("min_p and repetition_penalty: the text /v1/completions samples with them, over ModelInfer and GenerateStream", async () => {
    const prompt = "Tell me";
    const http = (extra: object) =>
      gw.client.completions
        .create({ model: "tiny", prompt, max_tokens: 16, temperature: 1, seed: 99, ...extra })
        .then((r) => r.choices[0]!.text);
    const both = { min_p: 0.3, repetition_penalty: 1.5 };
    const want = await http(both);
    // They change this seeded answer.
    expect(want).not.toBe(await http({}));
    const infer = await call(
      c.kserve,
      "ModelInfer",
      inferRequest(prompt, {
        max_tokens: param.int(16),
        temperature: param.dbl(1),
        seed: param.int(99),
        min_p: param.dbl(0.3),
        // As a string, as KServe clients may send numbers.
        repetition_penalty: { string_param: "1.5" },
      }),
    );
    expect(outputText(infer)).toBe(want);
    const s = await generate(c, {
      model: "tiny",
      prompt,
      max_tokens: 16,
      temperature: 1,
      seed: 99,
      ...both,
    });
    expect(s.error).toBeNull();
    expect(s.messages.map((m) => m.text).join("")).toBe(want);
    const bad = await call(
      c.kserve,
      "ModelInfer",
      inferRequest(prompt, { min_p: param.dbl(1.5) }),
    ).catch((e) => e);
    expect(bad.code).toBe(status.INVALID_ARGUMENT);
    expect(trailer(bad, "em-param")).toBe("min_p");
  });

  it("bad requests: INVALID_ARGUMENT with EM_GATEWAY_BAD_REQUEST", async () => {
    const ok = inferRequest("hi");
    const cases: [string, unknown][] = [
      ["no inputs", { model_name: "tiny", inputs: [] }],
      [
        "text_input not BYTES",
        {
          model_name: "tiny",
          inputs: [
            { name: "text_input", datatype: "FP32", shape: [1], contents: { fp32_contents: [1] } },
          ],
        },
      ],
      ["no prompts", { model_name: "tiny", inputs: [bytesInput([], [0])] }],
      ["65 prompts", { model_name: "tiny", inputs: [bytesInput(Array(65).fill("a"), [65])] }],
      ["shape mismatch", { model_name: "tiny", inputs: [bytesInput("a", [3])] }],
      ["negative dimensions", { model_name: "tiny", inputs: [bytesInput("a", [-1, -1])] }],
      ["no dimensions", { model_name: "tiny", inputs: [bytesInput("a", [])] }],
      ["no element", { model_name: "tiny", inputs: [bytesInput([], [0])] }],
      [
        "invalid UTF-8",
        {
          model_name: "tiny",
          inputs: [
            {
              name: "text_input",
              datatype: "BYTES",
              shape: [1],
              contents: { bytes_contents: [Buffer.from([0xff, 0xfe])] },
            },
          ],
        },
      ],
      [
        "raw contents not length-prefixed",
        {
          model_name: "tiny",
          inputs: [{ name: "text_input", datatype: "BYTES", shape: [1] }],
          raw_input_contents: [Buffer.from([9, 0, 0, 0, 65])],
        },
      ],
      [
        "BYTES with fp32 contents beside its bytes",
        {
          model_name: "tiny",
          inputs: [
            {
              name: "text_input",
              datatype: "BYTES",
              shape: [1],
              contents: { bytes_contents: [Buffer.from("hi")], fp32_contents: [1, 2] },
            },
          ],
        },
      ],
      ["unknown output", { ...ok, outputs: [{ name: "logits" }] }],
      [
        "an output asked for twice",
        { ...ok, outputs: [{ name: "finish_reason" }, { name: "finish_reason" }] },
      ],
      ["temperature 5", { ...ok, parameters: { temperature: param.dbl(5) } }],
      ["temperature a bool", { ...ok, parameters: { temperature: param.bool(true) } }],
      ["temperature not numeric", { ...ok, parameters: { temperature: param.str("hot") } }],
      ["max_tokens in hex", { ...ok, parameters: { max_tokens: param.str("0x10") } }],
      ["max_tokens empty", { ...ok, parameters: { max_tokens: param.str(" ") } }],
      ["top_p 0", { ...ok, parameters: { top_p: param.dbl(0) } }],
      ["max_tokens 0", { ...ok, parameters: { max_tokens: param.int(0) } }],
      ["max_tokens 2.5", { ...ok, parameters: { max_tokens: param.dbl(2.5) } }],
      ["stop a number", { ...ok, parameters: { stop: param.int(3) } }],
      ["priority 2.5", { ...ok, parameters: { priority: param.dbl(2.5) } }],
      // This gateway schedules in arrival order (priority.test.ts has one that does not).
      ["priority on an fcfs gateway", { ...ok, parameters: { priority: param.int(2) } }],
    ];
    for (const [what, req] of cases) {
      const err = await callError(c.kserve, "ModelInfer", req);
      expect(err.code, what).toBe(status.INVALID_ARGUMENT);
      expect(trailer(err, "em-code"), what).toBe("EM_GATEWAY_BAD_REQUEST");
    }
    // Past the context: INVALID_ARGUMENT with its own code; the gateway keeps serving.
    const long = await callError(
      c.kserve,
      "ModelInfer",
      inferRequest("hi", { max_tokens: param.int(100_000) }),
    );
    expect(long.code).toBe(status.INVALID_ARGUMENT);
    expect(trailer(long, "em-code")).toBe("EM_GATEWAY_PROMPT_TOO_LONG");
    expect(trailer(long, "em-param")).toBe("max_tokens");
    const fine = await call(
      c.kserve,
      "ModelInfer",
      inferRequest("hi", { max_tokens: param.int(2) }),
    );
    expect(fine.parameters.completion_tokens.int64_param).toBeGreaterThan(0);
  });

  it("an unknown model: NOT_FOUND", async () => {
    const err = await callError(c.kserve, "ModelInfer", {
      ...inferRequest("hi"),
      model_name: "gpt-4",
    });
    expect(err.code).toBe(status.NOT_FOUND);
    expect(trailer(err, "em-code")).toBe("EM_GATEWAY_UNKNOWN_MODEL");
  });
});

/** A ModelStreamInfer call: writes `requests`, half-closes, reads every response. */
function streamInfer(requests: unknown[]): Promise<StreamResult> {
  return new Promise((resolve) => {
    const messages: any[] = [];
    const s = (c.kserve as any).ModelStreamInfer();
    s.on("data", (m: any) => messages.push(m));
    s.on("error", (error: ServiceError) => resolve({ messages, error }));
    s.on("end", () => resolve({ messages, error: null }));
    for (const r of requests) s.write(r);
    s.end();
  });
}

const isFinal = (m: any) => m.infer_response.parameters.triton_final_response?.bool_param === true;

describe("ModelStreamInfer (Triton's streaming inference)", () => {
  const greedy = { max_tokens: param.int(6), temperature: param.dbl(0) };

  it("streams each request's text in pieces that add up to ModelInfer's, several requests at once", async () => {
    const prompts = ["The weather today", "Tell me"];
    const want: string[] = [];
    for (const p of prompts)
      want.push(outputText(await call(c.kserve, "ModelInfer", inferRequest(p, greedy))));
    const streamed = { ...greedy, stream: param.bool(true) };
    const r = await streamInfer([
      inferRequest(prompts[0]!, streamed, { id: "a" }),
      { ...inferRequest("x", streamed, { id: "bad" }), model_name: "gpt-4" },
      inferRequest(prompts[1]!, streamed, { id: "b" }),
      // Not streamed (no stream flag, as Triton's LLM backends default): one response.
      inferRequest(prompts[1]!, greedy, { id: "c" }),
    ]);
    expect(r.error).toBeNull();
    const of = (id: string) => r.messages.filter((m) => m.infer_response.id === id);
    for (const [id, text] of [
      ["a", want[0]],
      ["b", want[1]],
    ] as const) {
      const ms = of(id);
      expect(ms.length, id).toBeGreaterThan(2);
      expect(ms.every((m) => !m.error_message)).toBe(true);
      expect(ms.map((m) => outputText(m.infer_response)).join(""), id).toBe(text);
      // Only the last is final, and it has the reason and the counts.
      expect(ms.map(isFinal), id).toEqual([...Array(ms.length - 1).fill(false), true]);
      const last = ms.at(-1)!.infer_response.parameters;
      expect(last.finish_reason.string_param).toMatch(/^(stop|length)$/);
      expect(Number(last.completion_tokens.int64_param)).toBeGreaterThan(0);
    }
    const whole = of("c");
    expect(whole).toHaveLength(1);
    expect(outputText(whole[0].infer_response)).toBe(want[1]);
    expect(isFinal(whole[0])).toBe(true);
    // The bad request: an error response naming it; the others went on.
    const bad = of("bad");
    expect(bad).toHaveLength(1);
    expect(bad[0].error_message).toMatch(/^EM_GATEWAY_UNKNOWN_MODEL: .*gpt-4/);
    expect(bad[0].infer_response.parameters.em_code.string_param).toBe("EM_GATEWAY_UNKNOWN_MODEL");
  });

  it("a batch streams element by element; raw in, raw out; an empty final response on request", async () => {
    const prompts = ["The weather today", "Tell me"];
    const want = outputTexts(
      await call(c.kserve, "ModelInfer", {
        model_name: "tiny",
        inputs: [bytesInput(prompts, [2])],
        parameters: greedy,
      }),
    );
    const raw = Buffer.concat(
      prompts.flatMap((p) => {
        const len = Buffer.alloc(4);
        len.writeUInt32LE(Buffer.byteLength(p));
        return [len, Buffer.from(p)];
      }),
    );
    const r = await streamInfer([
      {
        model_name: "tiny",
        id: "batch",
        inputs: [
          { name: "text_input", datatype: "BYTES", shape: [2] },
          { name: "stream", datatype: "BOOL", shape: [1] },
        ],
        raw_input_contents: [raw, Buffer.from([1])],
        parameters: { ...greedy, triton_enable_empty_final_response: param.bool(true) },
      },
    ]);
    expect(r.error).toBeNull();
    const ms = r.messages;
    const last = ms.at(-1)!;
    expect(isFinal(last)).toBe(true);
    expect(last.infer_response.outputs).toEqual([]);
    expect(ms.slice(0, -1).some(isFinal)).toBe(false);
    const pieces = ms.slice(0, -1).map((m) => {
      expect(m.infer_response.outputs[0].shape).toEqual([2]);
      expect(m.infer_response.raw_output_contents).toHaveLength(2);
      return outputTexts(m.infer_response);
    });
    expect([0, 1].map((i) => pieces.map((p) => p[i]).join(""))).toEqual(want);
    // The reasons come with the last text: "" in every piece before.
    const reasons = outputTexts(ms.at(-2)!.infer_response, "finish_reason");
    expect(reasons.every((f) => /^(stop|length)$/.test(f))).toBe(true);
    expect(reasons.join(",")).toBe(ms.at(-2)!.infer_response.parameters.finish_reason.string_param);
    for (const m of ms.slice(0, -2))
      expect(outputTexts(m.infer_response, "finish_reason")).toEqual(["", ""]);
  });

  it("bad stream flags are request errors; a cancelled stream cancels its requests", async () => {
    const r = await streamInfer([
      inferRequest("hi", { ...greedy, stream: param.int(1) }, { id: "p" }),
      {
        ...inferRequest("hi", greedy, { id: "i" }),
        inputs: [
          bytesInput("hi"),
          { name: "stream", datatype: "FP32", shape: [1], contents: { fp32_contents: [1] } },
        ],
      },
    ]);
    expect(r.error).toBeNull();
    expect(r.messages.map((m) => [m.infer_response.id, m.error_message.split(":")[0]])).toEqual(
      expect.arrayContaining([
        ["p", "EM_GATEWAY_BAD_REQUEST"],
        ["i", "EM_GATEWAY_BAD_REQUEST"],
      ]),
    );
    // Cancel after the first piece: the job stops well before its 200 tokens.
    const before = await metric(gw.url, "expertmesh_gateway_generation_tokens_total");
    await new Promise<void>((resolve) => {
      const s = (c.kserve as any).ModelStreamInfer();
      s.on("data", () => s.cancel());
      s.on("error", () => resolve());
      s.write(
        inferRequest("Tell me", {
          max_tokens: param.int(200),
          temperature: param.dbl(0),
          stream: param.bool(true),
        }),
      );
    });
    await waitFor("the cancelled request to stop", async () =>
      (await metric(gw.url, "expertmesh_gateway_num_requests_running")) === 0 ? true : undefined,
    );
    const generated = (await metric(gw.url, "expertmesh_gateway_generation_tokens_total")) - before;
    expect(generated).toBeLessThan(200);
  });
});

describe("GenerateStream", () => {
  it("streams deltas that add up to ModelInfer's text, then usage", async () => {
    const prompt = "In the beginning";
    const unary = await call(
      c.kserve,
      "ModelInfer",
      inferRequest(prompt, { max_tokens: param.int(16), temperature: param.dbl(0) }),
    );
    const s = await generate(c, { model: "tiny", prompt, max_tokens: 16, temperature: 0 });
    expect(s.error).toBeNull();
    expect(s.messages.length).toBeGreaterThan(2);
    const last = s.messages.at(-1);
    for (const m of s.messages.slice(0, -1)) {
      expect(m.text.length).toBeGreaterThan(0);
      expect(m.finish_reason ?? "").toBe("");
      expect(m.usage).toBeUndefined();
    }
    expect(s.messages.map((m) => m.text).join("")).toBe(outputText(unary));
    expect(last.finish_reason).toBe(unary.parameters.finish_reason.string_param);
    const prompt_tokens = unary.parameters.prompt_tokens.int64_param;
    const completion_tokens = unary.parameters.completion_tokens.int64_param;
    expect(last.usage).toEqual({
      prompt_tokens,
      completion_tokens,
      total_tokens: prompt_tokens + completion_tokens,
    });
  });

  it("cuts the text at a stop string", async () => {
    const req = { model: "tiny", prompt: "Hi", max_tokens: 24, temperature: 0 };
    const full = (await generate(c, req)).messages.map((m) => m.text).join("");
    const stop = full.slice(3, 5);
    expect(stop.length).toBe(2);
    const cut = await generate(c, { ...req, stop: [stop] });
    expect(cut.messages.map((m) => m.text).join("")).toBe(full.slice(0, full.indexOf(stop)));
    expect(cut.messages.at(-1).finish_reason).toBe("stop");
  });

  it("structured output: the same text as /v1/completions under the same constraint", async () => {
    const req = { model: "tiny", prompt: "Colour:", max_tokens: 24, temperature: 0 };
    for (const [field, body] of [
      ["structured_outputs_json", { structured_outputs: { choice: ["red", "green", "blue"] } }],
      ["structured_outputs_json", { structured_outputs: { regex: "[a-c]{2,4}" } }],
      ["response_format_json", { response_format: { type: "json_object" } }],
    ] as const) {
      const value = Object.values(body)[0];
      const http = await gw.client.completions.create({ ...req, ...body } as never);
      const s = await generate(c, { ...req, [field]: JSON.stringify(value) });
      expect(s.error, JSON.stringify(body)).toBeNull();
      expect(s.messages.map((m) => m.text).join("")).toBe(
        (http as { choices: { text: string }[] }).choices[0]!.text,
      );
    }
    const bad = await generate(c, { ...req, structured_outputs_json: '{"choice": []}' });
    expect(bad.error?.code).toBe(status.INVALID_ARGUMENT);
    expect(trailer(bad.error!, "em-param")).toBe("structured_outputs.choice");
  });

  it("bad requests: INVALID_ARGUMENT; an unknown model: NOT_FOUND", async () => {
    for (const patch of [
      { temperature: 5 },
      { top_p: 1.5 },
      { max_tokens: 0 },
      { presence_penalty: -3 },
      { stop: ["a", "b", "c", "d", "e"] },
      { max_tokens: 100_000 },
      // An fcfs gateway (priority.test.ts has one that schedules by priority).
      { priority: -1 },
    ]) {
      const s = await generate(c, { model: "tiny", prompt: "hi", ...patch });
      expect(s.error?.code, JSON.stringify(patch)).toBe(status.INVALID_ARGUMENT);
      expect(s.messages).toEqual([]);
    }
    const s = await generate(c, { model: "gpt-4", prompt: "hi" });
    expect(s.error?.code).toBe(status.NOT_FOUND);
    expect(trailer(s.error!, "em-code")).toBe("EM_GATEWAY_UNKNOWN_MODEL");
  });
});

/** Reads a ChatStream to its end (messages, then the status if not OK). */
function chat(client: Client, req: unknown): Promise<StreamResult> {
  return new Promise((resolve) => {
    const messages: any[] = [];
    const s: ClientReadableStream<any> = (client as any).ChatStream(req);
    s.on("data", (m: any) => messages.push(m));
    s.on("error", (error: ServiceError) => resolve({ messages, error }));
    s.on("end", () => resolve({ messages, error: null }));
  });
}

/** A ChatStream's messages put together as one chat message. */
function chatAnswer(messages: any[]) {
  const calls: { id: string; name: string; arguments: string }[] = [];
  for (const m of messages)
    for (const t of m.tool_calls ?? []) {
      calls[t.index] ??= { id: "", name: "", arguments: "" };
      const c = calls[t.index]!;
      c.id ||= t.id ?? "";
      c.name ||= t.name ?? "";
      c.arguments += t.arguments ?? "";
    }
  const last = messages.at(-1);
  return {
    content: messages.map((m) => m.content ?? "").join(""),
    reasoning: messages.map((m) => m.reasoning_content ?? "").join(""),
    calls,
    finish: last?.finish_reason,
    usage: last?.usage,
  };
}

describe("ChatStream", () => {
  const messages = [
    { role: "system", content: "You are terse." },
    { role: "user", content: "Name a colour." },
  ];
  const weather = {
    type: "function" as const,
    function: {
      name: "get_weather",
      parameters: {
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
        additionalProperties: false,
      },
    },
  };

  it("answers as /v1/chat/completions does: content deltas, finish reason, usage", async () => {
    const http = await gw.client.chat.completions.create({
      model: "tiny",
      messages: messages as any,
      max_tokens: 12,
      temperature: 0,
    });
    const s = await chat(c.gen, { model: "tiny", messages, max_tokens: 12, temperature: 0 });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    expect(a.content).toBe(http.choices[0]!.message.content);
    expect(a.content.length).toBeGreaterThan(0);
    expect(a.finish).toBe(http.choices[0]!.finish_reason);
    expect(a.usage).toEqual({
      prompt_tokens: http.usage!.prompt_tokens,
      completion_tokens: http.usage!.completion_tokens,
      total_tokens: http.usage!.total_tokens,
    });
    for (const m of s.messages.slice(0, -1)) expect(m.usage).toBeUndefined();
  });

  it("min_p 1 answers the greedy text at any temperature; repetition_penalty as over HTTP", async () => {
    const req = { model: "tiny", messages, max_tokens: 24 };
    const greedy = chatAnswer((await chat(c.gen, { ...req, temperature: 0 })).messages);
    const hot = await chat(c.gen, { ...req, temperature: 2, seed: 3, min_p: 1 });
    expect(hot.error).toBeNull();
    expect(chatAnswer(hot.messages).content).toBe(greedy.content);
    const http = await gw.client.chat.completions.create({
      model: "tiny",
      messages: messages as any,
      max_tokens: 24,
      temperature: 0,
      repetition_penalty: 50,
    } as never);
    const s = await chat(c.gen, { ...req, temperature: 0, repetition_penalty: 50 });
    expect(chatAnswer(s.messages).content).toBe(http.choices[0]!.message.content);
    expect(chatAnswer(s.messages).content).not.toBe(greedy.content);
  });

  it("continue_final_message: the continuation, as over HTTP", async () => {
    const prefixed = [...messages, { role: "assistant", content: "It is sunny in" }];
    const body = { model: "tiny", max_tokens: 8, temperature: 0 };
    const http = await gw.client.chat.completions.create({
      ...body,
      messages: prefixed as any,
      continue_final_message: true,
    } as never);
    const s = await chat(c.gen, { ...body, messages: prefixed, continue_final_message: true });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    expect(a.content).toBe(http.choices[0]!.message.content);
    expect(a.usage.prompt_tokens).toBe(http.usage!.prompt_tokens);
    const bad = await chat(c.gen, { ...body, messages, continue_final_message: true });
    expect(bad.error?.code).toBe(status.INVALID_ARGUMENT);
    expect(trailer(bad.error!, "em-param")).toBe("continue_final_message");
  });

  it("tools: a required call streams its id and name, then its arguments, as over HTTP", async () => {
    const body = { model: "tiny", max_tokens: 48, temperature: 0 };
    const http = await gw.client.chat.completions.create({
      ...body,
      messages: [{ role: "user", content: "Weather in Paris?" }],
      tools: [weather],
      tool_choice: "required",
    });
    const s = await chat(c.gen, {
      ...body,
      messages: [{ role: "user", content: "Weather in Paris?" }],
      tools_json: JSON.stringify([weather]),
      tool_choice: "required",
    });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    const want = http.choices[0]!.message.tool_calls!;
    expect(want.length).toBeGreaterThan(0);
    expect(a.calls.map((x) => [x.name, x.arguments])).toEqual(
      want.map((x: any) => [x.function.name, x.function.arguments]),
    );
    expect(a.calls.every((x) => x.id.startsWith("call_"))).toBe(true);
    expect(a.finish).toBe(http.choices[0]!.finish_reason);
    // The first delta of a call names it; the pieces after carry arguments only.
    const first = s.messages.find((m) => (m.tool_calls ?? []).length > 0)!;
    expect(first.tool_calls[0]).toMatchObject({ index: 0, name: "get_weather" });
  });

  it("a custom tool named in tool_choice: its input in the arguments, as over HTTP", async () => {
    const calc = {
      type: "custom",
      custom: {
        name: "calc",
        format: {
          type: "grammar",
          grammar: { syntax: "lark", definition: 'start: /[0-9]{1,2}/ ("+" /[0-9]{1,2}/)~0..2' },
        },
      },
    };
    const body = { model: "tiny", max_tokens: 40, temperature: 0 };
    const http = await gw.client.chat.completions.create({
      ...body,
      messages: [{ role: "user", content: "Compute" }],
      tools: [calc as never],
      tool_choice: { type: "custom", custom: { name: "calc" } },
    });
    const s = await chat(c.gen, {
      ...body,
      messages: [{ role: "user", content: "Compute" }],
      tools_json: JSON.stringify([calc]),
      tool_choice: "calc",
    });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    const want = http.choices[0]!.message.tool_calls![0]!;
    expect(want.type).toBe("custom");
    expect(a.calls.map((x) => [x.name, x.arguments])).toEqual([
      ["calc", want.type === "custom" ? want.custom.input : ""],
    ]);
    expect(a.calls[0]!.arguments).toMatch(/^[0-9]{1,2}(?:\+[0-9]{1,2}){0,2}$/);
  });

  it("a named function, earlier calls and their results in the history", async () => {
    // Cities from a list: the random model's call ends within the budget.
    const cities = {
      ...weather,
      function: {
        ...weather.function,
        parameters: {
          ...weather.function.parameters,
          properties: { city: { enum: ["Paris", "Rome"] } },
        },
      },
    };
    const history = [
      { role: "user", content: "Weather in Paris?" },
      {
        role: "assistant",
        tool_calls: [
          { index: 0, id: "call_1", name: "get_weather", arguments: '{"city": "Paris"}' },
        ],
      },
      { role: "tool", tool_call_id: "call_1", content: "sunny" },
      { role: "user", content: "And Rome?" },
    ];
    const httpHistory = [
      history[0],
      {
        role: "assistant",
        content: null,
        tool_calls: [
          {
            id: "call_1",
            type: "function",
            function: { name: "get_weather", arguments: '{"city": "Paris"}' },
          },
        ],
      },
      history[2],
      history[3],
    ];
    const http = await gw.client.chat.completions.create({
      model: "tiny",
      messages: httpHistory as any,
      max_tokens: 48,
      temperature: 0,
      tools: [cities],
      tool_choice: { type: "function", function: { name: "get_weather" } },
    });
    const s = await chat(c.gen, {
      model: "tiny",
      messages: history,
      max_tokens: 48,
      temperature: 0,
      tools_json: JSON.stringify([cities]),
      tool_choice: "get_weather",
    });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    const want = http.choices[0]!.message.tool_calls![0]! as {
      function: { name: string; arguments: string };
    };
    expect(a.calls).toHaveLength(1);
    expect([a.calls[0]!.name, a.calls[0]!.arguments]).toEqual([
      want.function.name,
      want.function.arguments,
    ]);
    // (This random model pads the arguments with the grammar's whitespace until max_tokens.)
    expect(a.calls[0]!.id.startsWith("call_")).toBe(true);
    expect(a.finish).toBe(http.choices[0]!.finish_reason);
  });

  it("structured output: an instance of the schema, the same as over HTTP", async () => {
    const format = {
      type: "json_schema" as const,
      json_schema: {
        name: "cat",
        schema: {
          type: "object",
          properties: { name: { enum: ["Tom", "Kitty"] }, age: { type: "integer" } },
          required: ["name", "age"],
          additionalProperties: false,
        },
      },
    };
    const body = { model: "tiny", max_tokens: 64, temperature: 0 };
    const http = await gw.client.chat.completions.create({
      ...body,
      messages: messages as any,
      response_format: format,
    });
    const s = await chat(c.gen, {
      ...body,
      messages,
      response_format_json: JSON.stringify(format),
    });
    expect(s.error).toBeNull();
    const a = chatAnswer(s.messages);
    expect(a.content).toBe(http.choices[0]!.message.content);
    if (a.finish === "stop")
      expect(Object.keys(JSON.parse(a.content)).sort()).toEqual(["age", "name"]);
    else expect(a.content.trimStart().startsWith("{")).toBe(true);
  });

  it("structured_outputs_json: vLLM's regex and choice, the same answer as over HTTP", async () => {
    const body = { model: "tiny", max_tokens: 24, temperature: 0 };
    for (const so of [{ regex: "[a-c]{2,5}( [0-9])?" }, { choice: ["yes", "no", "maybe"] }]) {
      const http = await gw.client.chat.completions.create({
        ...body,
        messages: messages as any,
        structured_outputs: so,
      } as any);
      const s = await chat(c.gen, {
        ...body,
        messages,
        structured_outputs_json: JSON.stringify(so),
      });
      expect(s.error).toBeNull();
      const a = chatAnswer(s.messages);
      expect(a.content).toBe(http.choices[0]!.message.content);
      expect(a.finish).toBe("stop");
      if ("regex" in so) expect(a.content).toMatch(/^[a-c]{2,5}( [0-9])?$/);
      else expect(so.choice).toContain(a.content);
    }
    const bad = await chat(c.gen, {
      ...body,
      messages,
      structured_outputs_json: '{"regex": "(?=x)"}',
    });
    expect(bad.error?.code).toBe(status.INVALID_ARGUMENT);
  });

  it("a thinking model streams its thinking as reasoning_content", async () => {
    const r1 = await startGateway(dir, { reasoningParser: "deepseek-r1" });
    const g = await startGrpcGateway({ ctx: r1.ctx }, { port: 0, host: "127.0.0.1" });
    const gen = new generation(`127.0.0.1:${g.port}`, credentials.createInsecure());
    try {
      const body = { model: "tiny", max_tokens: 12, temperature: 0 };
      const question = [{ role: "user", content: "What is 2 + 2?" }];
      const http = await r1.client.chat.completions.create({ ...body, messages: question as any });
      const m = http.choices[0]!.message as unknown as {
        content: string;
        reasoning_content: string;
      };
      const a = chatAnswer((await chat(gen, { ...body, messages: question })).messages);
      // This random model never closes its thought within 12 tokens: all of it is thinking.
      expect(m.reasoning_content.length).toBeGreaterThan(0);
      expect([a.reasoning, a.content]).toEqual([m.reasoning_content, m.content]);
    } finally {
      gen.close();
      await g.close();
      await r1.close();
    }
  });

  it("bad requests: INVALID_ARGUMENT naming the field; an unknown model: NOT_FOUND", async () => {
    const ok = { model: "tiny", messages, max_tokens: 4 };
    for (const [patch, param] of [
      [{ messages: [] }, "messages"],
      [{ messages: [{ role: "robot", content: "hi" }] }, "messages.0.role"],
      [{ tools_json: "[{" }, "tools_json"],
      [{ response_format_json: '{"type": "xml"}' }, "response_format"],
      [{ chat_template_kwargs_json: "[1]" }, "chat_template_kwargs"],
      [{ temperature: 5 }, "temperature"],
      [{ tool_choice: "required" }, "tool_choice"],
      // The chat route's own checks of a conversation: a tool result that names no call.
      [{ messages: [...messages, { role: "tool", content: "sunny" }] }, "messages"],
      [{ tools_json: '[{"type": "function", "function": {"name": ""}}]' }, "tools"],
      // An fcfs gateway (priority.test.ts has one that schedules by priority).
      [{ priority: 3 }, "priority"],
    ] as const) {
      const s = await chat(c.gen, { ...ok, ...patch });
      expect(s.error?.code, JSON.stringify(patch)).toBe(status.INVALID_ARGUMENT);
      expect(trailer(s.error!, "em-code")).toBe("EM_GATEWAY_BAD_REQUEST");
      expect(s.error!.details, JSON.stringify(patch)).toContain(param);
      expect(s.messages).toEqual([]);
    }
    const s = await chat(c.gen, { ...ok, model: "gpt-4" });
    expect(s.error?.code).toBe(status.NOT_FOUND);
  });
});

describe("request ids and the request log", () => {
  it("x-request-id in every answer's metadata (the client's, or a new one); a log line per call", async () => {
    const lines: string[] = [];
    const g = await startGrpcGateway(
      { ctx: gw.ctx, logRequest: (l) => lines.push(l) },
      { port: 0, host: "127.0.0.1" },
    );
    const k = clients(g.port);
    // A unary call's response metadata and trailers.
    const ids = (method: string, req: unknown, md: Metadata) =>
      new Promise<{ header?: string; trailer?: string; code: number }>((resolve) => {
        let header: string | undefined;
        const c = (k.kserve as any)[method](req, md, () => {});
        c.on("metadata", (m: Metadata) => {
          header = m.get("x-request-id")[0] as string;
        });
        c.on("status", (st: { code: number; metadata: Metadata }) =>
          resolve({
            ...(header !== undefined ? { header } : {}),
            trailer: st.metadata.get("x-request-id")[0] as string,
            code: st.code,
          }),
        );
      });
    try {
      const md = new Metadata();
      md.set("x-request-id", "trace-7");
      const ok = await ids("ModelInfer", inferRequest("hi", { max_tokens: param.int(2) }), md);
      expect(ok).toEqual({ header: "trace-7", trailer: "trace-7", code: status.OK });
      const missing = await ids("ModelMetadata", { name: "gpt-4" }, new Metadata());
      expect(missing.code).toBe(status.NOT_FOUND);
      expect(missing.trailer).toMatch(/^[0-9a-f-]{36}$/);
      expect(lines).toEqual([
        expect.stringMatching(
          /^rpc trace-7 \/inference.GRPCInferenceService\/ModelInfer OK in \d+ ms$/,
        ),
        expect.stringMatching(
          new RegExp(
            `^rpc ${missing.trailer} /inference.GRPCInferenceService/ModelMetadata NOT_FOUND in \\d+ ms$`,
          ),
        ),
      ]);
    } finally {
      k.kserve.close();
      k.gen.close();
      await g.close();
    }
  });
});

describe("API keys and message size", () => {
  it("with keys: UNAUTHENTICATED without the bearer metadata; health stays open", async () => {
    const g = await startGrpcGateway(
      { ctx: gw.ctx, apiKeys: ["sekret"], maxRequestBytes: 1024 },
      { port: 0, host: "127.0.0.1" },
    );
    const k = clients(g.port);
    try {
      const md = new Metadata();
      md.set("authorization", "Bearer sekret");
      const wrong = new Metadata();
      wrong.set("authorization", "Bearer nope");
      expect(await call(k.kserve, "ServerLive", {})).toEqual({ live: true });
      expect(await call(k.kserve, "ModelReady", { name: "tiny" })).toEqual({ ready: true });
      for (const m of [undefined, wrong]) {
        const err = await callError(k.kserve, "ModelInfer", inferRequest("hi"), m);
        expect(err.code).toBe(status.UNAUTHENTICATED);
        expect(trailer(err, "em-code")).toBe("EM_GATEWAY_UNAUTHORIZED");
        expect((await callError(k.kserve, "ModelMetadata", { name: "tiny" }, m)).code).toBe(
          status.UNAUTHENTICATED,
        );
      }
      const s = await generate(k, { model: "tiny", prompt: "hi", max_tokens: 2 });
      expect(s.error?.code).toBe(status.UNAUTHENTICATED);
      const res = await call(
        k.kserve,
        "ModelInfer",
        inferRequest("hi", { max_tokens: param.int(2) }),
        md,
      );
      expect(res.parameters.completion_tokens.int64_param).toBeGreaterThan(0);
      // A message over maxRequestBytes is refused by grpc-js itself.
      const big = await callError(k.kserve, "ModelInfer", inferRequest("x".repeat(4000)), md);
      expect(big.code).toBe(status.RESOURCE_EXHAUSTED);
    } finally {
      k.kserve.close();
      k.gen.close();
      await g.close();
    }
  });
});

describe("overload, shard failures and cancellation", () => {
  let g: TestGateway;
  let h: ReturnType<typeof holdable>;
  let failing = false;
  let gg: GrpcGateway;
  let k: Clients;
  beforeAll(async () => {
    g = await startGateway(dir, {
      maxQueueDepth: 1,
      maxRunning: 1,
      wrap: (r) => {
        const failable: ExpertRunner = {
          run: (...args) => {
            if (failing)
              throw new ExpertMeshError(
                "EM_DISPATCH_UNAVAILABLE",
                "no replica of shard 0 answered",
              );
            return r.run(...args);
          },
        };
        h = holdable(failable);
        return h.runner;
      },
    });
    gg = await startGrpcGateway({ ctx: g.ctx }, { port: 0, host: "127.0.0.1" });
    k = clients(gg.port);
  });
  afterAll(async () => {
    h?.release();
    k?.kserve.close();
    k?.gen.close();
    await gg?.close();
    await g?.close();
  });

  it("a full admission queue: RESOURCE_EXHAUSTED with retry-after", async () => {
    h.hold();
    try {
      const req = inferRequest("hello", { max_tokens: param.int(3), temperature: param.dbl(0) });
      const first = call(k.kserve, "ModelInfer", req);
      await h.entered;
      const second = call(k.kserve, "ModelInfer", req);
      await waitFor("the second request to wait", async () =>
        (await metric(g.url, "expertmesh_gateway_num_requests_waiting")) === 1 ? true : undefined,
      );
      const err = await callError(k.kserve, "ModelInfer", req);
      expect(err.code).toBe(status.RESOURCE_EXHAUSTED);
      expect(trailer(err, "em-code")).toBe("EM_GATEWAY_OVERLOADED");
      expect(trailer(err, "retry-after")).toBe("1");
      const s = await generate(k, { model: "tiny", prompt: "hello", max_tokens: 3 });
      expect(s.error?.code).toBe(status.RESOURCE_EXHAUSTED);
      h.release();
      expect(outputText(await first)).toBe(outputText(await second));
    } finally {
      h.release();
    }
  });

  it("shards that do not answer: UNAVAILABLE (unary and stream)", async () => {
    failing = true;
    try {
      const err = await callError(k.kserve, "ModelInfer", inferRequest("hello"));
      expect(err.code).toBe(status.UNAVAILABLE);
      expect(trailer(err, "em-code")).toBe("EM_DISPATCH_UNAVAILABLE");
      const s = await generate(k, { model: "tiny", prompt: "hello", max_tokens: 3 });
      expect(s.error?.code).toBe(status.UNAVAILABLE);
    } finally {
      failing = false;
    }
    const ok = await call(
      k.kserve,
      "ModelInfer",
      inferRequest("hello", { max_tokens: param.int(2) }),
    );
    expect(ok.parameters.completion_tokens.int64_param).toBeGreaterThan(0);
  });

  it("a client that cancels its stream frees its sequence", async () => {
    const aborted = () => finishedRequests(g.url, "abort");
    const before = await aborted();
    let n = 0;
    const s = await generate(
      k,
      { model: "tiny", prompt: "Keep talking", max_tokens: 200, temperature: 0 },
      (_m, stream) => {
        if (++n === 2) {
          // Hold the engine so the sequence cannot finish on its own meanwhile.
          h.hold();
          stream.cancel();
        }
      },
    );
    try {
      expect(s.error?.code).toBe(status.CANCELLED);
      await waitFor("the server to see the cancellation", async () =>
        (await aborted()) === before + 1 ? true : undefined,
      );
    } finally {
      h.release();
    }
    await waitFor("the sequence's blocks to be freed", async () =>
      (await metric(g.url, "expertmesh_gateway_num_requests_running")) === 0 &&
      (await metric(g.url, "expertmesh_gateway_kv_cache_usage_perc")) === 0
        ? true
        : undefined,
    );
    expect(await metric(g.url, "expertmesh_gateway_generation_tokens_total")).toBeLessThan(200);
  });
});

describe("status mapping", () => {
  it("maps our errors to gRPC codes", () => {
    expect(grpcStatus(new ExpertMeshError("EM_DISPATCH_UNAVAILABLE", "x")).code).toBe(
      status.UNAVAILABLE,
    );
    expect(grpcStatus(new ExpertMeshError("EM_GATEWAY_OVERLOADED", "x")).code).toBe(
      status.RESOURCE_EXHAUSTED,
    );
    expect(grpcStatus(new Error("boom")).code).toBe(status.INTERNAL);
  });
});

describe("cache_salt (vLLM's) over KServe v2 and GenerateStream", () => {
  it("a salted prompt's cached blocks serve the same salt only, whichever API sent it", async () => {
    const prompt = "The lighthouse keeper climbed the stairs to light the lamp at dusk. ".repeat(3);
    const hits = () => metric(gw.url, "expertmesh_gateway_prefix_cache_hits");
    /** Prefix cache hits (tokens) of one call. */
    const hitsOf = async (f: () => Promise<unknown>) => {
      const before = await hits();
      await f();
      return (await hits()) - before;
    };
    const infer = (salt: string) =>
      call(
        c.kserve,
        "ModelInfer",
        inferRequest(prompt, { max_tokens: param.int(2), cache_salt: param.str(salt) }),
      );
    const rest = (salt: unknown) =>
      fetch(`${gw.url}/v2/models/tiny/infer`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({
          inputs: [{ name: "text_input", datatype: "BYTES", shape: [1], data: [prompt] }],
          parameters: { max_tokens: 2, cache_salt: salt },
        }),
      });
    expect(await hitsOf(() => infer("kserve-a"))).toBe(0);
    expect(await hitsOf(() => infer("kserve-b"))).toBe(0);
    const again = await hitsOf(() => infer("kserve-a"));
    expect(again).toBeGreaterThan(0);
    // REST and GenerateStream with the same salt find the same blocks.
    expect(await hitsOf(async () => expect((await rest("kserve-a")).status).toBe(200))).toBe(again);
    const gen = await hitsOf(() =>
      generate(c, { model: "tiny", prompt, max_tokens: 2, cache_salt: "kserve-a" }),
    );
    expect(gen).toBe(again);
    expect(await hitsOf(() => generate(c, { model: "tiny", prompt, max_tokens: 2 }))).toBe(0);
    // Refused: empty, or not a string.
    for (const bad of [param.str(""), param.bool(true)]) {
      const err = await callError(
        c.kserve,
        "ModelInfer",
        inferRequest(prompt, { cache_salt: bad }),
      );
      expect(err.code).toBe(status.INVALID_ARGUMENT);
    }
    const r = await rest(7);
    expect(r.status).toBe(400);
    expect(((await r.json()) as { param: string }).param).toBe("parameters.cache_salt");
  });
});
