// KServe's Open Inference Protocol v2 over REST, beside the gRPC one (grpc.ts), for the same
// text model (text-model.ts): health, server and model metadata, model readiness, `infer`
// with a BYTES `text_input` tensor (a batch of prompts; as JSON or in Triton's binary tensor
// data extension, kserve-tensors.ts; compressed or not), and Triton's generate extension
// (`generate`, `generate_stream`: the prompt and sampling fields as plain JSON). Errors are
// the protocol's {"error": message}, with our stable `code` and the `param` beside it.

import { deflateSync, gzipSync } from "node:zlib";
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { isObject } from "../util/objects.ts";
import { packageVersion } from "../util/version.ts";
import { ApiError, refusalHeaders, toApiError } from "./errors.ts";
import { checkServed, logServerError, type ServeContext, startJob } from "./jobs.ts";
import {
  decodeBytesElements,
  encodeBytesElements,
  HEADER_LENGTH,
  inflateBody,
  inputBinaries,
  responseBody,
  splitBody,
} from "./kserve-tensors.ts";
import { bind, eventStream } from "./openai.ts";
import {
  bad,
  checkPromptShape,
  checkShape,
  decimal,
  FINISH_OUTPUT,
  inferJobSpec,
  inferOutcome,
  MODEL_VERSION,
  NUMBER_FIELDS,
  OUTPUTS,
  type OutputName,
  type OutputValues,
  outputsAsked,
  type SamplingFields,
  sampling,
  TEXT_INPUT,
  TEXT_OUTPUT,
  textJobSpec,
} from "./text-model.ts";

export interface KserveRestOptions {
  readonly ctx: ServeContext;
  /** Whether the model can serve now (every shard answers). */
  readonly ready?: () => Promise<boolean>;
  /** Request bodies, inflated, at most this many bytes (the HTTP API's limit). */
  readonly bodyLimit: number;
}

/** The health routes, open without an API key (as /health and /ready). */
export const KSERVE_OPEN_ROUTES = ["/v2/health/live", "/v2/health/ready"];

type ModelParams = { name: string; version?: string };

/** Registers the /v2 routes (an encapsulated plugin: its own error format). */
export function kserveRestRoutes(o: KserveRestOptions) {
  const { ctx } = o;
  return async (app: FastifyInstance) => {
    // Bodies come as bytes, whatever their content type (Triton's client sends none, binary
    // ones are JSON and then tensor bytes): readBody splits, inflates and parses them.
    app.removeAllContentTypeParsers();
    app.addContentTypeParser("*", { parseAs: "buffer" }, (_req, body, done) => done(null, body));
    const readBody = (req: FastifyRequest) => {
      const raw = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
      const header = req.headers[HEADER_LENGTH];
      return splitBody(
        inflateBody(raw, req.headers["content-encoding"], o.bodyLimit),
        Array.isArray(header) ? header[0] : header,
      );
    };
    app.setErrorHandler((err, req, reply) => {
      const e = toApiError(err);
      logServerError(ctx, `${req.method} ${req.url}`, err);
      reply.headers(refusalHeaders(e));
      reply
        .status(e.status)
        .send({ error: e.message, code: e.code, ...(e.param ? { param: e.param } : {}) });
    });
    const isReady = async () => {
      try {
        return o.ready ? await o.ready() : true;
      } catch {
        return false;
      }
    };
    const checkModel = (p: ModelParams) => {
      checkServed(ctx, p.name, "model_name");
      if (p.version !== undefined && p.version !== MODEL_VERSION)
        throw new ApiError(
          "EM_GATEWAY_UNKNOWN_MODEL",
          `the model '${p.name}' has no version '${p.version}' (its only version is '${MODEL_VERSION}')`,
          { param: "model_version" },
        );
    };
    // Each model route with and without /versions/{version}.
    const model = (
      method: "get" | "post",
      tail: string,
      handler: (req: FastifyRequest<{ Params: ModelParams }>, reply: FastifyReply) => unknown,
    ) => {
      for (const path of [`/v2/models/:name${tail}`, `/v2/models/:name/versions/:version${tail}`])
        app[method]<{ Params: ModelParams }>(path, async (req, reply) => {
          checkModel(req.params);
          return handler(req, reply);
        });
    };

    app.get("/v2/health/live", async () => ({ live: true }));
    app.get("/v2/health/ready", async (_req, reply) => {
      const ready = await isReady();
      reply.status(ready ? 200 : 503);
      return { ready };
    });
    app.get("/v2", async () => ({
      name: "expertmesh",
      version: packageVersion(),
      extensions: ["binary_tensor_data", "generate"],
    }));
    // Any shape: a batch of prompts, its answers in the same shape.
    const tensor = (name: string) => ({ name, datatype: "BYTES", shape: [-1] });
    model("get", "", async () => ({
      name: ctx.servedModelName,
      versions: [MODEL_VERSION],
      platform: "expertmesh",
      inputs: [tensor(TEXT_INPUT)],
      outputs: OUTPUTS.map(tensor),
    }));
    model("get", "/ready", async (_req, reply) => {
      const ready = await isReady();
      reply.status(ready ? 200 : 503);
      return { name: ctx.servedModelName, ready };
    });

    model("post", "/infer", async (req, reply) => {
      const { json: b, binary } = readBody(req);
      const inputs = list(b["inputs"], "inputs");
      const { texts, shape } = inferTexts(inputs, inputBinaries(inputs, binary));
      const parameters = jsonFields(b["parameters"], "parameters");
      const wanted = requestedOutputs(b);
      const spec = await inferJobSpec(ctx, texts, sampling(parameters, ctx.samplingDefaults));
      const job = startJob(ctx, spec);
      bind(reply, job);
      await job.done;
      const r = inferOutcome(job, spec);
      const values: OutputValues = { [TEXT_OUTPUT]: r.texts, [FINISH_OUTPUT]: r.finishReasons };
      const binaries: Buffer[] = [];
      const outputs = wanted.map(({ name, binary }) => {
        if (!binary) return { name, datatype: "BYTES", shape, data: values[name] };
        const bytes = encodeBytesElements(values[name].map((t) => Buffer.from(t, "utf8")));
        binaries.push(bytes);
        return { name, datatype: "BYTES", shape, parameters: { binary_data_size: bytes.length } };
      });
      const answer = {
        model_name: ctx.servedModelName,
        model_version: MODEL_VERSION,
        ...(typeof b["id"] === "string" ? { id: b["id"] } : {}),
        parameters: {
          finish_reason: r.finishReason,
          prompt_tokens: r.promptTokens,
          completion_tokens: r.completionTokens,
        },
        outputs,
      };
      const encoding = responseEncoding(req.headers["accept-encoding"]);
      if (binaries.length === 0 && !encoding) return answer;
      let body: Buffer;
      if (binaries.length > 0) {
        const split = responseBody(answer, binaries);
        reply.header(HEADER_LENGTH, String(split.headerLength));
        reply.header("content-type", "application/octet-stream");
        body = split.body;
      } else {
        reply.header("content-type", "application/json; charset=utf-8");
        body = Buffer.from(JSON.stringify(answer), "utf8");
      }
      if (encoding) {
        reply.header("content-encoding", encoding);
        body = encoding === "gzip" ? gzipSync(body) : deflateSync(body);
      }
      return reply.send(body);
    });

    // Triton's generate extension: {"text_input": "...", "parameters": {...}}, the sampling
    // fields also at the top.
    const generateSpec = async (req: FastifyRequest) => {
      const b = readBody(req).json;
      const text = b[TEXT_INPUT];
      if (typeof text !== "string")
        throw bad(`'${TEXT_INPUT}' must be the prompt, a string`, TEXT_INPUT);
      const { [TEXT_INPUT]: _t, parameters, ...top } = b;
      const p = { ...top, ...(isObject(parameters) ? parameters : {}) };
      if (parameters !== undefined && !isObject(parameters))
        throw bad("'parameters' must be an object", "parameters");
      return textJobSpec(ctx, text, sampling(jsonFields(p, "parameters"), ctx.samplingDefaults));
    };
    const head = () => ({ model_name: ctx.servedModelName, model_version: MODEL_VERSION });
    model("post", "/generate", async (req, reply) => {
      const spec = await generateSpec(req);
      const job = startJob(ctx, spec);
      bind(reply, job);
      await job.done;
      const c = job.choices[0]!;
      return {
        ...head(),
        text_output: c.out.text,
        finish_reason: c.finishReason ?? "abort",
        prompt_tokens: spec.prompts[0]!.tokens.length,
        completion_tokens: job.completionTokens,
      };
    });
    model("post", "/generate_stream", async (req, reply) => {
      const spec = await generateSpec(req);
      const pending: string[] = [];
      let raw: FastifyReply["raw"] | null = null;
      const send = (o: unknown) => {
        const event = `data: ${JSON.stringify(o)}\n\n`;
        if (raw === null) pending.push(event);
        else if (!raw.destroyed) raw.write(event);
      };
      const job = startJob(ctx, spec, {
        onToken: (_c, _t, text) => {
          if (text) send({ ...head(), text_output: text });
        },
        onFinish: (c, text) =>
          send({ ...head(), text_output: text, finish_reason: c.finishReason ?? "abort" }),
      });
      // Admitted (no 4xx left to answer): the events start.
      raw = eventStream(reply, ctx);
      bind(reply, job);
      for (const e of pending) raw.write(e);
      try {
        await job.done;
      } catch (err) {
        const e = toApiError(err);
        send({ error: e.message, code: e.code });
      }
      if (!raw.destroyed) raw.end();
      return reply;
    });
  };
}

function list(x: unknown, param: string): unknown[] {
  if (x === undefined || x === null) return [];
  if (!Array.isArray(x)) throw bad(`'${param}' must be an array`, param);
  return x;
}

/**
 * The outputs to answer with, in order: those the request names (each once), or all of the
 * model's; and whether each goes in binary: asked on the output (`parameters.binary_data`)
 * or for every output (the request's `binary_data_output`).
 */
function requestedOutputs(b: Record<string, unknown>): { name: OutputName; binary: boolean }[] {
  const flag = (x: unknown, param: string): boolean | undefined => {
    if (x === undefined || x === null) return undefined;
    if (typeof x !== "boolean") throw bad(`'${param}' must be true or false`, param);
    return x;
  };
  const all = flag(
    isObject(b["parameters"]) ? b["parameters"]["binary_data_output"] : undefined,
    "parameters.binary_data_output",
  );
  const asked = list(b["outputs"], "outputs");
  const names = outputsAsked(
    asked.map((out) => (isObject(out) ? out["name"] : undefined)),
    (i) => `outputs.${i}.name`,
  );
  return names.map((name, i) => {
    const p = isObject(asked[i]) ? asked[i]["parameters"] : undefined;
    if (p !== undefined && !isObject(p))
      throw bad("an output's 'parameters' must be an object", `outputs.${i}.parameters`);
    return {
      name,
      binary: flag(p?.["binary_data"], `outputs.${i}.parameters.binary_data`) ?? all ?? false,
    };
  });
}

/** gzip or deflate when the client accepts it (Triton's response_compression_algorithm). */
function responseEncoding(accept: string | undefined): "gzip" | "deflate" | null {
  const offered = (accept ?? "")
    .split(",")
    .map((e) => e.trim().toLowerCase())
    .filter((e) => !/;\s*q=0(\.0*)?$/.test(e))
    .map((e) => e.split(";")[0]!.trim());
  return offered.includes("gzip") ? "gzip" : offered.includes("deflate") ? "deflate" : null;
}

/**
 * The prompts of an infer request: the elements of the input named text_input, or of the
 * first BYTES input (its data flat or nested, as row-major tensor data may be; or its bytes
 * in the binary section), with its shape.
 */
function inferTexts(
  inputs: readonly unknown[],
  binaries: readonly (Buffer | null)[],
): { texts: string[]; shape: number[] } {
  let i = inputs.findIndex((t) => isObject(t) && t["name"] === TEXT_INPUT);
  if (i < 0) i = inputs.findIndex((t) => isObject(t) && t["datatype"] === "BYTES");
  const input = inputs[i];
  if (!isObject(input))
    throw bad(`infer needs a BYTES input named '${TEXT_INPUT}' holding the prompt text`, "inputs");
  const name = String(input["name"] ?? "");
  if (input["datatype"] !== "BYTES")
    throw bad(
      `input '${name}' must have datatype BYTES, got '${String(input["datatype"] ?? "")}'`,
      `inputs.${i}.datatype`,
    );
  const shape = input["shape"];
  // Checked before the data is flattened to its depth (a deeper nesting stays nested and is
  // then refused as a count or a non-string).
  checkShape(name, shape, `inputs.${i}.shape`);
  const bytes = binaries[i];
  let texts: unknown[];
  if (bytes) {
    const utf8 = new TextDecoder("utf-8", { fatal: true });
    const elements = decodeBytesElements(
      bytes,
      `the binary data of input '${name}'`,
      `inputs.${i}.parameters.binary_data_size`,
    );
    try {
      texts = elements.map((e) => utf8.decode(e));
    } catch {
      throw bad(`input '${name}' is not valid UTF-8 text`, `inputs.${i}.data`);
    }
  } else texts = list(input["data"], `inputs.${i}.data`).flat(shape.length);
  checkPromptShape(name, shape, texts.length, `inputs.${i}.shape`);
  if (texts.some((t) => typeof t !== "string"))
    throw bad(`input '${name}': its elements must be prompts, strings`, `inputs.${i}.data`);
  return { texts: texts as string[], shape: shape as number[] };
}

/**
 * Sampling fields from a JSON object: numbers, or numeric strings (KServe clients send
 * parameters as strings too); `stop` a string or strings. Other parameters are left
 * alone, as over gRPC (clients add their own, and Triton's generate takes more).
 */
function jsonFields(p: unknown, param: string): SamplingFields {
  if (p === undefined || p === null) return { stop: [] };
  if (!isObject(p)) throw bad(`'${param}' must be an object`, param);
  const out: SamplingFields = { stop: [] };
  for (const [k, v] of Object.entries(p)) {
    if ((NUMBER_FIELDS as readonly string[]).includes(k)) {
      if (v === null) continue;
      const n = typeof v === "number" ? v : typeof v === "string" ? decimal(v) : Number.NaN;
      if (!Number.isFinite(n)) throw bad(`parameter '${k}' must be a number`, `${param}.${k}`);
      out[k as (typeof NUMBER_FIELDS)[number]] = n;
    } else if (k === "cache_salt") {
      if (v === null) continue;
      if (typeof v !== "string")
        throw bad("parameter 'cache_salt' must be a string", `${param}.cache_salt`);
      out.cache_salt = v;
    } else if (k === "stop") {
      if (v === null) continue;
      const stops = typeof v === "string" ? [v] : v;
      if (!Array.isArray(stops) || stops.some((s) => typeof s !== "string"))
        throw bad("parameter 'stop' must be a string or strings", `${param}.stop`);
      out.stop = stops as string[];
    }
  }
  return out;
}
