// KServe's Open Inference Protocol v2 over REST, beside the gRPC one (grpc.ts), for the same
// text model (text-model.ts): health, server and model metadata, model readiness, `infer`
// with a BYTES `text_input` tensor, and Triton's generate extension (`generate`,
// `generate_stream`: the prompt and sampling fields as plain JSON). Errors are the
// protocol's {"error": message}, with our stable `code` and the `param` beside it.
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import { isObject } from "../util/objects.ts";
import { ApiError, toApiError } from "./errors.ts";
import { logServerError, type ServeContext, startJob } from "./jobs.ts";
import { bind, eventStream } from "./openai.ts";
import {
  bad,
  decimal,
  MODEL_VERSION,
  NUMBER_FIELDS,
  packageVersion,
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
}

/** The health routes, open without an API key (as /health and /ready). */
export const KSERVE_OPEN_ROUTES = ["/v2/health/live", "/v2/health/ready"];

type ModelParams = { name: string; version?: string };

/** Registers the /v2 routes (an encapsulated plugin: its own error format). */
export function kserveRestRoutes(o: KserveRestOptions) {
  const { ctx } = o;
  return async (app: FastifyInstance) => {
    app.setErrorHandler((err, req, reply) => {
      const e = toApiError(err);
      logServerError(ctx, `${req.method} ${req.url}`, err);
      if (e.retryAfter !== undefined) reply.header("retry-after", String(e.retryAfter));
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
      if (p.name !== ctx.servedModelName)
        throw new ApiError(
          "EM_GATEWAY_UNKNOWN_MODEL",
          `the model '${p.name}' does not exist here; this gateway serves '${ctx.servedModelName}'`,
          { param: "model_name" },
        );
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
      extensions: ["generate"],
    }));
    const tensor = (name: string) => ({ name, datatype: "BYTES", shape: [1] });
    model("get", "", async () => ({
      name: ctx.servedModelName,
      versions: [MODEL_VERSION],
      platform: "expertmesh",
      inputs: [tensor(TEXT_INPUT)],
      outputs: [tensor(TEXT_OUTPUT)],
    }));
    model("get", "/ready", async (_req, reply) => {
      const ready = await isReady();
      reply.status(ready ? 200 : 503);
      return { name: ctx.servedModelName, ready };
    });

    model("post", "/infer", async (req, reply) => {
      const b = objectBody(req.body);
      const text = inferText(b);
      for (const [i, out] of list(b["outputs"], "outputs").entries())
        if (!isObject(out) || out["name"] !== TEXT_OUTPUT)
          throw bad(
            `outputs[${i}]: the model's only output is '${TEXT_OUTPUT}'`,
            `outputs.${i}.name`,
          );
      const spec = await textJobSpec(
        ctx,
        text,
        sampling(jsonFields(b["parameters"], "parameters")),
      );
      const job = startJob(ctx, spec);
      bind(reply, job);
      await job.done;
      const c = job.choices[0]!;
      return {
        model_name: ctx.servedModelName,
        model_version: MODEL_VERSION,
        ...(typeof b["id"] === "string" ? { id: b["id"] } : {}),
        parameters: {
          finish_reason: c.finishReason ?? "abort",
          prompt_tokens: spec.prompts[0]!.tokens.length,
          completion_tokens: job.completionTokens,
        },
        outputs: [{ ...tensor(TEXT_OUTPUT), data: [c.out.text] }],
      };
    });

    // Triton's generate extension: {"text_input": "...", "parameters": {...}}, the sampling
    // fields also at the top.
    const generateSpec = async (body: unknown) => {
      const b = objectBody(body);
      const text = b[TEXT_INPUT];
      if (typeof text !== "string")
        throw bad(`'${TEXT_INPUT}' must be the prompt, a string`, TEXT_INPUT);
      const { [TEXT_INPUT]: _t, parameters, ...top } = b;
      const p = { ...top, ...(isObject(parameters) ? parameters : {}) };
      if (parameters !== undefined && !isObject(parameters))
        throw bad("'parameters' must be an object", "parameters");
      return textJobSpec(ctx, text, sampling(jsonFields(p, "parameters")));
    };
    const head = () => ({ model_name: ctx.servedModelName, model_version: MODEL_VERSION });
    model("post", "/generate", async (req, reply) => {
      const spec = await generateSpec(req.body);
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
      const spec = await generateSpec(req.body);
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
      raw = eventStream(reply);
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

function objectBody(body: unknown): Record<string, unknown> {
  if (!isObject(body)) throw bad("the request body must be a JSON object", "body");
  return body;
}

function list(x: unknown, param: string): unknown[] {
  if (x === undefined || x === null) return [];
  if (!Array.isArray(x)) throw bad(`'${param}' must be an array`, param);
  return x;
}

/**
 * The prompt of an infer request: the one element of the input named text_input, or of
 * the first BYTES input (its data flat or nested, as row-major tensor data may be).
 */
function inferText(b: Record<string, unknown>): string {
  const inputs = list(b["inputs"], "inputs");
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
  if (
    !Array.isArray(shape) ||
    shape.length === 0 ||
    shape.some((d) => !Number.isInteger(d) || (d as number) < 0)
  )
    throw bad(`input '${name}': shape must be an array of integers >= 0`, `inputs.${i}.shape`);
  const data = list(input["data"], `inputs.${i}.data`).flat(shape.length);
  const declared = (shape as number[]).reduce((a, d) => a * d, 1);
  if (declared !== data.length)
    throw bad(
      `input '${name}' has shape [${shape.join(", ")}] but holds ${data.length} elements`,
      `inputs.${i}.shape`,
    );
  if (data.length !== 1)
    throw bad(
      `input '${name}' must hold exactly one prompt (shape [1]), got ${data.length}`,
      `inputs.${i}.shape`,
    );
  if (typeof data[0] !== "string")
    throw bad(`input '${name}': its element must be the prompt, a string`, `inputs.${i}.data`);
  return data[0];
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
