// The gateway's gRPC port (@grpc/grpc-js; protos loaded at run time from proto/): KServe's
// Open Inference Protocol v2, inference.GRPCInferenceService (ServerLive, ServerReady,
// ModelReady, ServerMetadata, ModelMetadata, ModelInfer with a BYTES text input and a BYTES
// text output, a batch of prompts, and Triton's streaming ModelStreamInfer), and
// expertmesh.v1.Generation: GenerateStream, which streams the text as it is produced, and
// ChatStream, a chat answered by the chat completions route's code. Both run on the same
// engine as the HTTP routes; errors map to gRPC status codes (with our stable code in the
// `em-code` trailer).
import { randomUUID } from "node:crypto";
import { fileURLToPath } from "node:url";
import {
  experimental,
  type handleServerStreamingCall,
  type handleUnaryCall,
  loadPackageDefinition,
  Metadata,
  ResponderBuilder,
  Server,
  ServerCredentials,
  type ServerDuplexStream,
  ServerInterceptingCall,
  type ServerInterceptor,
  ServerListenerBuilder,
  type ServerUnaryCall,
  type ServiceClientConstructor,
  type StatusObject,
  status,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import type { Span } from "@opentelemetry/api";
import { Value } from "@sinclair/typebox/value";
import type { LogFields } from "../util/log.ts";
import { packageVersion } from "../util/version.ts";
import { ApiKeys } from "./api-keys.ts";
import { type ChatDelta, ChatOutput, type ToolCallDelta } from "./chat-output.ts";
import { ApiError, toApiError } from "./errors.ts";
import {
  checkServed,
  type Job,
  logServerError,
  REQUEST_ID,
  type ServeContext,
  startJob,
} from "./jobs.ts";
import { decodeBytesElements, encodeBytesElements } from "./kserve-tensors.ts";
import { chatRun, usageOf } from "./openai.ts";
import { outputFormat } from "./output-grammar.ts";
import { ChatCompletionRequest, type CompletionRequest } from "./schemas.ts";
import { clientIdentity, type ServingCertificate } from "./serving-tls.ts";
import {
  bad,
  checkPromptShape,
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
import {
  type GenAiOperation,
  operationOfMethod,
  refusalSpan,
  requestTraces,
  type Tracing,
  traceResponse,
} from "./tracing.ts";

/** Where the .proto files are: `proto/` at the package root (from src/gateway or dist/gateway). */
export const PROTO_DIR = fileURLToPath(new URL("../../proto/", import.meta.url));
export const PROTO_FILES = ["kserve/grpc_predict_v2.proto", "expertmesh/v1/generation.proto"];

/** proto-loader's options: field names as in the .proto, 64-bit integers as numbers. */
export const PROTO_LOADER_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: false,
  arrays: true,
  objects: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

// ---- the messages, as proto-loader gives them (defaults: false, arrays/objects: true) ----

interface InferParameter {
  bool_param?: boolean;
  int64_param?: number;
  string_param?: string;
  double_param?: number;
  uint64_param?: number;
  parameter_choice?: string;
}
type Parameters = Record<string, InferParameter>;

interface InferTensorContents {
  bytes_contents?: Buffer[];
  [other: string]: unknown[] | undefined;
}

interface ModelInferRequest {
  model_name?: string;
  model_version?: string;
  id?: string;
  parameters: Parameters;
  inputs: {
    name?: string;
    datatype?: string;
    shape: number[];
    parameters: Parameters;
    contents?: InferTensorContents;
  }[];
  outputs: { name?: string; parameters: Parameters }[];
  raw_input_contents: Buffer[];
}

interface ModelInferResponse {
  model_name: string;
  model_version: string;
  id: string;
  parameters: Parameters;
  outputs: {
    name: string;
    datatype: string;
    shape: number[];
    contents?: { bytes_contents: Buffer[] };
  }[];
  raw_output_contents: Buffer[];
}

interface ModelStreamInferResponse {
  error_message?: string;
  infer_response: ModelInferResponse;
}

interface ModelRequest {
  name?: string;
  version?: string;
}

interface TensorMetadata {
  name: string;
  datatype: string;
  shape: number[];
}

/** The sampling fields GenerateRequest and ChatRequest share. */
interface SamplingRequest {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  seed?: number;
  stop: string[];
  presence_penalty?: number;
  frequency_penalty?: number;
  priority?: number;
  cache_salt?: string;
}

interface GenerateRequest extends SamplingRequest {
  model?: string;
  prompt?: string;
  suffix?: string;
  response_format_json?: string;
  structured_outputs_json?: string;
}

interface GenerateResponse {
  text: string;
  finish_reason?: string;
  usage?: Usage;
}

interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

interface ToolCallMsg {
  index?: number;
  id?: string;
  name?: string;
  arguments?: string;
}

interface ChatRequestMsg extends SamplingRequest {
  model?: string;
  messages: { role?: string; content?: string; tool_calls: ToolCallMsg[]; tool_call_id?: string }[];
  tools_json?: string;
  tool_choice?: string;
  response_format_json?: string;
  chat_template_kwargs_json?: string;
  structured_outputs_json?: string;
  continue_final_message?: boolean;
}

interface ChatResponseMsg {
  content?: string;
  reasoning_content?: string;
  tool_calls?: ToolCallMsg[];
  finish_reason?: string;
  usage?: Usage;
}

// ---- the server ----

export interface GrpcGatewayOptions {
  readonly ctx: ServeContext;
  /** Whether the model can serve now (every shard answers); default: always. */
  readonly ready?: () => Promise<boolean>;
  /** Bearer keys accepted (`authorization: Bearer KEY` metadata) on everything but the health RPCs. */
  readonly apiKeys?: readonly string[] | ApiKeys;
  /** Largest request message (bytes); default: grpc-js's 4 MiB. */
  readonly maxRequestBytes?: number;
  /** Where a line per finished call goes (--log-requests); default: none. */
  readonly logRequest?: (line: string, fields?: LogFields) => void;
}

export interface GrpcGateway {
  readonly server: Server;
  /** The port bound (the one asked for, or the one picked for 0). */
  readonly port: number;
  /** Stops taking calls and waits for those in flight (then cancels them after `graceMs`). */
  close(graceMs?: number): Promise<void>;
}

/** Loads the protos and binds the gRPC server on `host:port` (0: any free port). */
export async function startGrpcGateway(
  o: GrpcGatewayOptions,
  listen: {
    port: number;
    host?: string;
    /**
     * Serve over TLS with this certificate, and each one it changes to (serving-tls.ts);
     * with a client CA in it, only to clients presenting a certificate that CA signed.
     */
    tls?: ServingCertificate;
  },
): Promise<GrpcGateway> {
  const pkg = loadPackageDefinition(
    loadSync(
      PROTO_FILES.map((f) => `${PROTO_DIR}${f}`),
      PROTO_LOADER_OPTIONS,
    ),
  );
  const service = (path: string) =>
    (path.split(".").reduce<unknown>((o, k) => (o as Record<string, unknown>)[k], pkg) as
      | ServiceClientConstructor
      | undefined)!.service;
  const server = new Server({
    ...(o.maxRequestBytes !== undefined
      ? { "grpc.max_receive_message_length": o.maxRequestBytes }
      : {}),
    interceptors: [requestIds(o.logRequest)],
  });
  const h = handlers(o);
  server.addService(service("inference.GRPCInferenceService"), h.inference);
  server.addService(service("expertmesh.v1.Generation"), h.generation);
  const host = listen.host ?? "0.0.0.0";
  const address = host.includes(":") ? `[${host}]:${listen.port}` : `${host}:${listen.port}`;
  // grpc-js names the parameters the other way round: the first is the server's identity,
  // the second the CA its clients' certificates must chain to (null: none asked for).
  const { tls } = listen;
  const credentials = tls
    ? experimental.createCertificateProviderServerCredentials(
        tls,
        tls.verifiesClients ? tls : null,
        tls.verifiesClients,
      )
    : ServerCredentials.createInsecure();
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(address, credentials, (err, p) => (err ? reject(err) : resolve(p))),
  );
  return {
    server,
    port,
    close: (graceMs = 5000) =>
      new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, graceMs);
        // First, and closed: once the shutdown has begun, destroying them no longer ends it.
        void closeSilentSessions(server).then(() =>
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          }),
        );
      }),
  };
}

/**
 * Destroys the connections whose client never sent a byte (not even HTTP/2's preface: a
 * preconnect), and resolves once they have closed (at most 1 s): the graceful shutdown
 * waited for them until its grace cut everything. Reads grpc-js's own table of its HTTP/2
 * servers' sessions (1.14's `http2Servers`); without it, the shutdown is as before.
 */
async function closeSilentSessions(server: Server): Promise<void> {
  type Session = {
    socket?: { bytesRead?: number };
    destroyed?: boolean;
    destroy?: () => void;
    once?: (event: "close", listener: () => void) => void;
  };
  const servers = (
    server as unknown as { http2Servers?: Map<unknown, { sessions?: Set<Session> }> }
  ).http2Servers;
  if (!(servers instanceof Map)) return;
  const closing: Promise<void>[] = [];
  for (const { sessions } of servers.values())
    for (const s of sessions ?? []) {
      if (s.socket?.bytesRead !== 0 || s.destroyed || !s.destroy || !s.once) continue;
      closing.push(new Promise<void>((r) => s.once!("close", r)));
      s.destroy();
    }
  if (closing.length === 0) return;
  let cap: NodeJS.Timeout | undefined;
  await Promise.race([
    Promise.all(closing),
    new Promise<void>((r) => {
      cap = setTimeout(r, 1000);
    }),
  ]);
  clearTimeout(cap);
}

function handlers(o: GrpcGatewayOptions): {
  inference: UntypedServiceImplementation;
  generation: UntypedServiceImplementation;
} {
  const { ctx } = o;
  const keys = ApiKeys.from(o.apiKeys);
  const authorize = (md: Metadata) => {
    if (!keys.required) return;
    const v = md.get("authorization")[0];
    const m = /^Bearer\s+(.+)$/i.exec(typeof v === "string" ? v : "");
    const given = Buffer.from(m?.[1]?.trim() ?? "");
    if (!keys.accepts(given))
      throw new ApiError(
        "EM_GATEWAY_UNAUTHORIZED",
        "missing or invalid API key: send the metadata 'authorization: Bearer <key>'",
      );
  };
  const isReady = async () => {
    try {
      return o.ready ? await o.ready() : true;
    } catch {
      return false;
    }
  };
  const checkModel = (name: string | undefined, version: string | undefined, param: string) => {
    checkServed(ctx, name, param);
    if (version && version !== MODEL_VERSION)
      throw new ApiError(
        "EM_GATEWAY_UNKNOWN_MODEL",
        `the model '${name}' has no version '${version}' (its only version is '${MODEL_VERSION}')`,
        { param: "version" },
      );
  };
  // Any shape: a batch of prompts, its answers in the same shape.
  const tensor = (name: string): TensorMetadata => ({ name, datatype: "BYTES", shape: [-1] });
  /** Calls whose job's span was made (traced): their failures are on it. */
  const spanned = new WeakSet<object>();
  /** When each generation call came (epoch ms), for the span of one refused before its job. */
  const arrived = new WeakMap<object, number>();
  /** The caller's trace context and request id in a call's metadata. */
  const callerOf = (tracing: Tracing, metadata: Metadata | undefined) => {
    const md = (key: string) => {
      const v = metadata?.get(key)[0];
      return typeof v === "string" ? v : undefined;
    };
    const id = md("x-request-id");
    return {
      parent: tracing.extract({ traceparent: md("traceparent"), tracestate: md("tracestate") }),
      requestId: id !== undefined && REQUEST_ID.test(id) ? id : undefined,
    };
  };
  // A failed call's status; the server's own failures (5xx) are logged; a generation call
  // refused before its job gets a span of its own (refusalSpan) and the traceresponse.
  const failure = (
    call: {
      getPath(): string;
      metadata?: Metadata;
      request?: unknown;
    },
    err: unknown,
  ) => {
    logServerError(ctx, call.getPath(), err);
    const st = grpcStatus(err);
    if (spanned.has(call)) return st;
    // The model a request names: GenerateStream's and ChatStream's `model`, KServe's `model_name`.
    const request = call.request as { model?: unknown; model_name?: unknown } | undefined;
    const model = request?.model ?? request?.model_name;
    const span = refusal(call, err, arrived.get(call) ?? Date.now(), model, st.code);
    const value = span && traceResponse(span);
    if (value) st.metadata?.set("traceresponse", value);
    return st;
  };
  /**
   * The span of a generation call (or one message of ModelStreamInfer's stream) refused
   * before its job (refusalSpan); null without tracing or for a method that runs no job.
   */
  const refusal = (
    call: { metadata?: Metadata; getPath(): string },
    err: unknown,
    startTime: number,
    model: unknown,
    statusCode?: number,
  ): Span | null => {
    const path = call.getPath();
    const operation = operationOfMethod(path);
    const tracing = ctx.tracing;
    if (!tracing || !operation) return null;
    const e = toApiError(err);
    return refusalSpan(tracing, {
      operation,
      model:
        typeof model === "string" && model.length > 0 && model.length <= 256 ? model : undefined,
      ...callerOf(tracing, call.metadata),
      startTime,
      attributes: {
        "rpc.system": "grpc",
        "rpc.method": path,
        ...(statusCode !== undefined ? { "rpc.grpc.status_code": statusCode } : {}),
      },
      code: e.code,
      message: e.message,
    });
  };
  const unary = <Req, Res>(fn: (call: ServerUnaryCall<Req, Res>) => Promise<Res>) =>
    unaryCall(fn, failure);
  /**
   * startJob inside the call's trace (tracing.ts), when tracing is on: its span starts at
   * `t0` (epoch ms, when the call or the stream's request came), a child of the caller's
   * span named by `traceparent` metadata. A call that runs one job (not a bidirectional
   * stream of them) answers `traceresponse` in its response metadata; a message of
   * ModelStreamInfer's stream is told it (`onTraceResponse`) for its own responses.
   */
  const traced = (
    call: {
      metadata: Metadata;
      getPath(): string;
      sendMetadata?: (md: Metadata) => void;
      onTraceResponse?: (value: string) => void;
    },
    operation: GenAiOperation,
    t0: number,
    start: () => Job,
  ): Job => {
    const tracing = ctx.tracing;
    if (!tracing) return start();
    spanned.add(call);
    const { parent, requestId } = callerOf(tracing, call.metadata);
    return requestTraces.run(
      {
        tracing,
        parent,
        operation,
        startTime: t0,
        ...(requestId !== undefined ? { requestId } : {}),
        attributes: { "rpc.system": "grpc", "rpc.method": call.getPath() },
        span: null,
        ...(call.sendMetadata || call.onTraceResponse
          ? {
              onSpan: (span: Span) => {
                const value = traceResponse(span);
                if (!value) return;
                if (call.onTraceResponse) return call.onTraceResponse(value);
                const out = new Metadata();
                out.set("traceresponse", value);
                call.sendMetadata!(out);
              },
            }
          : {}),
      },
      start,
    );
  };

  const inference: UntypedServiceImplementation = {
    ServerLive: unary(async () => ({ live: true })),
    ServerReady: unary(async () => ({ ready: await isReady() })),
    ModelReady: unary<ModelRequest, { ready: boolean }>(async (call) => {
      checkModel(call.request.name, call.request.version, "name");
      return { ready: await isReady() };
    }),
    ServerMetadata: unary(async (call) => {
      authorize(call.metadata);
      return { name: "expertmesh", version: packageVersion(), extensions: [] };
    }),
    ModelMetadata: unary<ModelRequest, unknown>(async (call) => {
      authorize(call.metadata);
      checkModel(call.request.name, call.request.version, "name");
      return {
        name: ctx.servedModelName,
        versions: [MODEL_VERSION],
        platform: "expertmesh",
        inputs: [tensor(TEXT_INPUT)],
        outputs: OUTPUTS.map(tensor),
      };
    }),
    ModelInfer: unary<ModelInferRequest, ModelInferResponse>(async (call) => {
      const t0 = Date.now();
      arrived.set(call, t0);
      authorize(call.metadata);
      const r = call.request;
      const { spec, shape, raw, outputs } = await inferRequest(r);
      const job = traced(call, "text_completion", t0, () => startJob(ctx, spec));
      call.on("cancelled", () => job.cancel());
      if (call.cancelled) job.cancel();
      await job.done;
      const o = inferOutcome(job, spec);
      const values = { [TEXT_OUTPUT]: o.texts, [FINISH_OUTPUT]: o.finishReasons };
      return inferResponse(r, shape, raw, outputs, values, {
        finish_reason: { string_param: o.finishReason },
        prompt_tokens: { int64_param: o.promptTokens },
        completion_tokens: { int64_param: o.completionTokens },
      });
    }),
    ModelStreamInfer,
  };

  /** A ModelInfer request checked, its prompts tokenized into a job. */
  async function inferRequest(r: ModelInferRequest) {
    checkModel(r.model_name, r.model_version, "model_name");
    const { texts, shape, raw } = inferTexts(r);
    const outputs = outputsAsked(
      r.outputs.map((o) => o.name),
      () => "outputs",
    );
    const spec = await inferJobSpec(
      ctx,
      texts,
      sampling(parameterFields(r.parameters), ctx.samplingDefaults),
    );
    return { spec, shape, raw, outputs, stream: streamFlag(r) };
  }

  /**
   * An answer to `r`: the `outputs` asked, each in the input's shape, in the form asked (raw
   * contents for raw inputs, as KServe does); none with `values` null.
   */
  function inferResponse(
    r: ModelInferRequest,
    shape: number[],
    raw: boolean,
    outputs: readonly OutputName[],
    values: OutputValues | null,
    parameters: Parameters,
  ): ModelInferResponse {
    const answered = values === null ? [] : outputs;
    const data = answered.map((name) => values![name].map((t) => Buffer.from(t, "utf8")));
    return {
      model_name: ctx.servedModelName,
      model_version: MODEL_VERSION,
      id: r.id ?? "",
      parameters,
      outputs: answered.map((name, i) => ({
        name,
        datatype: "BYTES",
        shape,
        ...(raw ? {} : { contents: { bytes_contents: data[i]! } }),
      })),
      raw_output_contents: raw ? data.map(encodeBytesElements) : [],
    };
  }

  /**
   * Triton's streaming inference (ModelStreamInfer, what tritonclient's start_stream and
   * async_stream_infer use): every request on the stream runs as it arrives, several at once.
   * With `stream` (a parameter or a BOOL input, as Triton's LLM backends take it; default
   * false, as theirs) a request gets a response per piece of text, text_output in the input's
   * shape holding that piece at its prompt's place and "" elsewhere (finish_reason all ""),
   * so the pieces add up element by element; the last one has the reasons in finish_reason,
   * and the parameters finish_reason, prompt_tokens and completion_tokens. Without, one response as ModelInfer's. Every response
   * has `triton_final_response` (true on a request's last); with the request's
   * `triton_enable_empty_final_response`, the last is an empty one after the text. A request
   * that fails gets a response with `error_message` (and its id), and the stream goes on.
   */
  function ModelStreamInfer(call: ServerDuplexStream<ModelInferRequest, ModelStreamInferResponse>) {
    const jobs = new Set<Job>();
    const running = new Set<Promise<void>>();
    let ended = false;
    const send = (m: ModelStreamInferResponse) => {
      if (!call.cancelled && !call.writableEnded) call.write(m);
    };
    const finishIfDone = () => {
      if (ended && running.size === 0 && !call.cancelled && !call.writableEnded) call.end();
    };
    const final = (last: boolean): Parameters => ({ triton_final_response: { bool_param: last } });
    const one = async (r: ModelInferRequest) => {
      const t0 = Date.now();
      // One stream, many jobs: each its own span, whose traceresponse goes in the parameters
      // of the message's final response (the stream's metadata goes once).
      let traceParams: Parameters = {};
      const view = {
        metadata: call.metadata,
        getPath: () => call.getPath(),
        onTraceResponse: (value: string) => {
          traceParams = { traceresponse: { string_param: value } };
        },
      };
      try {
        authorize(call.metadata);
        const { spec, shape, raw, outputs, stream } = await inferRequest(r);
        const emptyFinal = r.parameters["triton_enable_empty_final_response"]?.bool_param === true;
        const n = spec.prompts.length;
        const tail = Array<string>(n).fill("");
        // A piece's finish_reason elements are "" (the last response has the reasons).
        const unfinished = Array<string>(n).fill("");
        const piece = (prompt: number, text: string) => {
          const texts = Array<string>(n).fill("");
          texts[prompt] = text;
          const values = { [TEXT_OUTPUT]: texts, [FINISH_OUTPUT]: unfinished };
          send({ infer_response: inferResponse(r, shape, raw, outputs, values, final(false)) });
        };
        const job = traced(view, "text_completion", t0, () =>
          startJob(ctx, spec, {
            onToken: (c, _t, text) => {
              if (stream && text) piece(c.prompt, text);
            },
            onFinish: (c, text) => {
              tail[c.prompt] = text;
            },
          }),
        );
        jobs.add(job);
        if (call.cancelled) job.cancel(); // cancelled while the prompt was being encoded
        try {
          await job.done;
        } finally {
          jobs.delete(job);
        }
        const o = inferOutcome(job, spec);
        const values = { [TEXT_OUTPUT]: stream ? tail : o.texts, [FINISH_OUTPUT]: o.finishReasons };
        send({
          infer_response: inferResponse(r, shape, raw, outputs, values, {
            finish_reason: { string_param: o.finishReason },
            prompt_tokens: { int64_param: o.promptTokens },
            completion_tokens: { int64_param: o.completionTokens },
            ...traceParams,
            ...final(!emptyFinal),
          }),
        });
        if (emptyFinal)
          send({
            infer_response: inferResponse(r, shape, raw, outputs, null, {
              ...traceParams,
              ...final(true),
            }),
          });
      } catch (err) {
        const e = toApiError(err);
        if (e.status >= 500) logServerError(ctx, call.getPath(), err);
        if (!spanned.has(view)) {
          const span = refusal(view, err, t0, r.model_name);
          const value = span && traceResponse(span);
          if (value) view.onTraceResponse(value);
        }
        send({
          error_message: `${e.code}: ${e.message}`,
          infer_response: inferResponse(r, [], false, [], null, {
            em_code: { string_param: e.code },
            ...traceParams,
            ...final(true),
          }),
        });
      }
    };
    call.on("data", (r: ModelInferRequest) => {
      const p = one(r).finally(() => {
        running.delete(p);
        finishIfDone();
      });
      running.add(p);
    });
    call.on("end", () => {
      ended = true;
      finishIfDone();
    });
    call.on("cancelled", () => {
      for (const job of jobs) job.cancel();
    });
  }

  const GenerateStream: handleServerStreamingCall<GenerateRequest, GenerateResponse> = (call) => {
    const send = (m: GenerateResponse) => {
      if (!call.cancelled && !call.writableEnded) call.write(m);
    };
    const fail = (err: unknown) => {
      const st = failure(call, err);
      if (!call.cancelled && !call.writableEnded) call.emit("error", st);
    };
    const run = async () => {
      const t0 = Date.now();
      arrived.set(call, t0);
      authorize(call.metadata);
      const r = call.request;
      checkModel(r.model, undefined, "model");
      // Structured output as on /v1/completions (output-grammar.ts).
      const { grammar } = outputFormat(ctx, {
        response_format: json(r.response_format_json, "response_format_json"),
        structured_outputs: json(r.structured_outputs_json, "structured_outputs_json"),
      } as unknown as CompletionRequest);
      const spec = {
        ...(await textJobSpec(
          ctx,
          r.prompt ?? "",
          sampling(generateParameters(r), ctx.samplingDefaults),
          r.suffix,
        )),
        ...(grammar ? { grammar } : {}),
      };
      const prompt = spec.prompts[0]!.tokens.length;
      const job: Job = traced(call, "text_completion", t0, () =>
        startJob(ctx, spec, {
          onToken: (_c, _t, text) => {
            if (text) send({ text });
          },
          onFinish: (c, text) => {
            const completion = job.completionTokens;
            send({
              text,
              finish_reason: c.finishReason ?? "",
              usage: {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
              },
            });
          },
        }),
      );
      call.on("cancelled", () => job.cancel());
      if (call.cancelled) job.cancel();
      await job.done;
      if (!call.cancelled && !call.writableEnded) call.end();
    };
    run().catch(fail);
  };

  const ChatStream: handleServerStreamingCall<ChatRequestMsg, ChatResponseMsg> = (call) => {
    const send = (m: ChatResponseMsg) => {
      if (!call.cancelled && !call.writableEnded) call.write(m);
    };
    const run = async () => {
      const t0 = Date.now();
      arrived.set(call, t0);
      authorize(call.metadata);
      const b = chatRequest(call.request);
      const { spec, outputOptions, finishOf } = await chatRun(ctx, b);
      const output = new ChatOutput(outputOptions);
      const head = output.first(); // a forced call's head (tool_choice naming a function)
      const forced = (head["tool_calls"] as ToolCallDelta[] | undefined) ?? [];
      if (forced.length > 0) send({ tool_calls: forced.map(toolCallMsg) });
      const deltas = (ds: ChatDelta[]) => {
        for (const d of ds) send(chatResponse(d));
      };
      const job: Job = traced(call, "chat", t0, () =>
        startJob(ctx, spec, {
          onToken: (_c, _t, text) => deltas(output.push(text)),
          onFinish: (c, text) => {
            deltas([...output.push(text), ...output.end()]);
            const usage = usageOf(job);
            send({
              finish_reason: finishOf(c, output) ?? "",
              usage: {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                total_tokens: usage.total_tokens,
              },
            });
          },
        }),
      );
      call.on("cancelled", () => job.cancel());
      if (call.cancelled) job.cancel();
      await job.done;
      if (!call.cancelled && !call.writableEnded) call.end();
    };
    run().catch((err: unknown) => {
      const st = failure(call, err);
      if (!call.cancelled && !call.writableEnded) call.emit("error", st);
    });
  };

  return { inference, generation: { GenerateStream, ChatStream } };
}

/** A chat delta (chat-output.ts) as a ChatStream message. */
function chatResponse(d: ChatDelta): ChatResponseMsg {
  if ("content" in d) return { content: d.content };
  if ("reasoning_content" in d) return { reasoning_content: d.reasoning_content };
  return { tool_calls: d.tool_calls.map(toolCallMsg) };
}

function toolCallMsg(t: ToolCallDelta): ToolCallMsg {
  return {
    index: t.index,
    ...(t.id !== undefined ? { id: t.id } : {}),
    ...(t.function.name !== undefined ? { name: t.function.name } : {}),
    arguments: t.function.arguments,
  };
}

/** A request's JSON text field, parsed (not JSON: EM_GATEWAY_BAD_REQUEST naming it). */
function json(text: string | undefined, param: string): unknown {
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (e) {
    throw bad(`'${param}' is not JSON: ${(e as Error).message}`, param);
  }
}

/**
 * A ChatStream request as the body of POST /v1/chat/completions (stream), checked against the
 * same schema; its JSON text fields parsed (a field that is not JSON: EM_GATEWAY_BAD_REQUEST).
 */
export function chatRequest(r: ChatRequestMsg): ChatCompletionRequest {
  const choice = r.tool_choice;
  const tools = json(r.tools_json, "tools_json");
  // A name in tool_choice: that tool, a custom one's by its own form.
  const custom =
    Array.isArray(tools) &&
    tools.some(
      (t) => (t as { type?: unknown; custom?: { name?: unknown } })?.custom?.name === choice,
    );
  const body: Record<string, unknown> = {
    model: r.model ?? "",
    messages: r.messages.map((m) => ({
      role: m.role ?? "",
      ...(m.content || m.tool_calls.length === 0 ? { content: m.content ?? "" } : {}),
      ...(m.tool_calls.length > 0
        ? {
            tool_calls: m.tool_calls.map((t) => ({
              id: t.id ?? "",
              type: "function",
              function: { name: t.name ?? "", arguments: t.arguments ?? "" },
            })),
          }
        : {}),
      ...(m.tool_call_id ? { tool_call_id: m.tool_call_id } : {}),
    })),
    ...generateParameters(r),
    stream: true,
    tools,
    tool_choice: !choice
      ? undefined
      : ["auto", "none", "required"].includes(choice)
        ? choice
        : custom
          ? { type: "custom", custom: { name: choice } }
          : { type: "function", function: { name: choice } },
    response_format: json(r.response_format_json, "response_format_json"),
    structured_outputs: json(r.structured_outputs_json, "structured_outputs_json"),
    chat_template_kwargs: json(r.chat_template_kwargs_json, "chat_template_kwargs_json"),
    continue_final_message: r.continue_final_message || undefined,
  };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  if (r.stop.length === 0) delete body["stop"];
  if (!Value.Check(ChatCompletionRequest, body)) {
    const e = Value.Errors(ChatCompletionRequest, body).First()!;
    const param = e.path.replace(/^\//, "").replaceAll("/", ".");
    throw bad(`'${param || "request"}' ${e.message.toLowerCase()}`, param || "request");
  }
  return body as ChatCompletionRequest;
}

/**
 * Every call's x-request-id (the client's metadata, or a new UUID) in its response metadata
 * and trailers, as HTTP answers carry the header; with `log`, a line when the call ends.
 */
function requestIds(
  log: ((line: string, fields?: LogFields) => void) | undefined,
): ServerInterceptor {
  return (method, call) => {
    let id = "";
    /** The call's trace, from the traceresponse its handler sent (tracing on). */
    let traceId: string | undefined;
    const t0 = performance.now();
    return new ServerInterceptingCall(
      call,
      new ResponderBuilder()
        .withStart((next) =>
          next(
            new ServerListenerBuilder()
              .withOnReceiveMetadata((md, nextMd) => {
                const given = md.get("x-request-id")[0];
                id = typeof given === "string" && REQUEST_ID.test(given) ? given : randomUUID();
                nextMd(md);
              })
              .build(),
          ),
        )
        .withSendMetadata((md, next) => {
          md.set("x-request-id", id);
          const tr = md.get("traceresponse")[0];
          if (typeof tr === "string") traceId = tr.split("-")[1];
          next(md);
        })
        .withSendStatus((st, next) => {
          const metadata = st.metadata ?? new Metadata();
          metadata.set("x-request-id", id);
          const ms = Math.round(performance.now() - t0);
          const code = status[st.code] ?? String(st.code);
          // A client certificate is there only when --tls-client-ca had it verified.
          const client = log && clientIdentity(call.getAuthContext().sslPeerCertificate);
          log?.(
            `rpc ${id} ${method.path} ${code} in ${ms} ms${traceId ? ` trace=${traceId}` : ""}` +
              (client ? ` client=${JSON.stringify(client)}` : ""),
            {
              request_id: id,
              rpc_method: method.path,
              grpc_status: code,
              duration_ms: ms,
              ...(traceId ? { trace_id: traceId } : {}),
              ...(client ? { client_cert: client } : {}),
            },
          );
          next({ ...st, metadata });
        })
        .build(),
    );
  };
}

/** A unary handler from an async function; anything it throws becomes a gRPC status. */
function unaryCall<Req, Res>(
  fn: (call: ServerUnaryCall<Req, Res>) => Promise<Res>,
  failure: (call: ServerUnaryCall<Req, Res>, err: unknown) => Partial<StatusObject>,
) {
  const h: handleUnaryCall<Req, Res> = (call, callback) => {
    fn(call).then(
      (res) => callback(null, res),
      (err) => callback(failure(call, err)),
    );
  };
  return h;
}

/** The gRPC status of an error: its HTTP status mapped, our code in the `em-code` trailer. */
export function grpcStatus(err: unknown): Partial<StatusObject> {
  const e = toApiError(err);
  const metadata = new Metadata();
  metadata.set("em-code", e.code);
  if (e.param !== null) metadata.set("em-param", e.param);
  if (e.retryAfter !== undefined) metadata.set("retry-after", String(e.retryAfter));
  return { code: grpcCode(e.status), details: clip(e.message, MAX_DETAILS), metadata };
}

/**
 * Longest status message: messages quote the request (a model name, a datatype), and
 * status travels in an HTTP/2 header, where ~90 KB made grpc-js drop the whole connection
 * (other clients' limits are 8-16 KB).
 */
const MAX_DETAILS = 1024;

function clip(text: string, max: number): string {
  return text.length <= max
    ? text
    : `${text.slice(0, max)}... (${text.length - max} more characters)`;
}

function grpcCode(httpStatus: number): status {
  switch (httpStatus) {
    case 400:
      return status.INVALID_ARGUMENT;
    case 401:
      return status.UNAUTHENTICATED;
    case 404:
      return status.NOT_FOUND;
    case 413:
    case 429:
      return status.RESOURCE_EXHAUSTED;
    case 503:
      return status.UNAVAILABLE;
    default:
      return status.INTERNAL;
  }
}

/**
 * The prompts of a ModelInfer request: the elements of the BYTES input named `text_input`,
 * or of the first BYTES input, from `contents.bytes_contents` or `raw_input_contents`.
 */
function inferTexts(r: ModelInferRequest): { texts: string[]; shape: number[]; raw: boolean } {
  let i = r.inputs.findIndex((t) => t.name === TEXT_INPUT);
  if (i < 0) i = r.inputs.findIndex((t) => t.datatype === "BYTES");
  const input = r.inputs[i];
  if (!input)
    throw bad(
      `ModelInfer needs a BYTES input named '${TEXT_INPUT}' holding the prompt text`,
      "inputs",
    );
  const name = input.name ?? "";
  if (input.datatype !== "BYTES")
    throw bad(
      `input '${name}' must have datatype BYTES, got '${input.datatype ?? ""}'`,
      "inputs.datatype",
    );
  const raw = r.raw_input_contents.length > 0;
  let elements: Buffer[];
  if (raw) {
    if (r.raw_input_contents.length !== r.inputs.length)
      throw bad(
        `raw_input_contents has ${r.raw_input_contents.length} entries for ${r.inputs.length} inputs`,
        "raw_input_contents",
      );
    if (r.inputs.some((t) => Object.values(t.contents ?? {}).some((v) => v && v.length > 0)))
      throw bad("give tensor contents or raw_input_contents, not both", "raw_input_contents");
    elements = decodeBytesElements(
      r.raw_input_contents[i]!,
      `raw contents of input '${name}'`,
      "raw_input_contents",
    );
  } else {
    const other = Object.entries(input.contents ?? {}).find(
      ([k, v]) => k !== "bytes_contents" && Array.isArray(v) && v.length > 0,
    );
    if (other)
      throw bad(
        `input '${name}' is BYTES: its contents go in bytes_contents, not ${other[0]}`,
        "inputs.contents",
      );
    elements = input.contents?.bytes_contents ?? [];
  }
  checkPromptShape(name, input.shape, elements.length, "inputs.shape");
  const utf8 = new TextDecoder("utf-8", { fatal: true });
  try {
    return { texts: elements.map((e) => utf8.decode(e)), shape: input.shape, raw };
  } catch {
    throw bad(`input '${name}' is not valid UTF-8 text`, "inputs.contents");
  }
}

/** The KServe request's parameters map: numbers as int64/uint64/double or numeric strings. */
function parameterFields(p: Parameters): SamplingFields {
  const num = (name: string): number | undefined => {
    const v = p[name];
    if (!v) return undefined;
    const x = v.int64_param ?? v.uint64_param ?? v.double_param;
    if (x !== undefined) return x;
    if (v.string_param !== undefined) {
      const n = decimal(v.string_param);
      if (Number.isFinite(n)) return n;
      throw bad(`parameter '${name}' must be a number, got '${v.string_param}'`, name);
    }
    if (v.bool_param !== undefined) throw bad(`parameter '${name}' must be a number`, name);
    return undefined;
  };
  const stop = p["stop"];
  if (stop?.parameter_choice && stop.string_param === undefined)
    throw bad("parameter 'stop' must be a string", "stop");
  const out: SamplingFields = { stop: stop?.string_param ? [stop.string_param] : [] };
  const salt = p["cache_salt"];
  if (salt?.parameter_choice && salt.string_param === undefined)
    throw bad("parameter 'cache_salt' must be a string", "cache_salt");
  if (salt?.string_param !== undefined) out.cache_salt = salt.string_param;
  for (const k of NUMBER_FIELDS) {
    const v = num(k);
    if (v !== undefined) out[k] = v;
  }
  return out;
}

/**
 * Whether a streaming request streams its text: the parameter `stream`, else a BOOL input
 * named `stream` (as Triton's LLM backends take it); false when neither says (their default:
 * a client that does not ask gets one response per request, as from any Triton model).
 */
function streamFlag(r: ModelInferRequest): boolean {
  const p = r.parameters["stream"];
  if (p?.parameter_choice !== undefined || p?.bool_param !== undefined) {
    if (p.bool_param === undefined) throw bad("parameter 'stream' must be a bool", "stream");
    return p.bool_param;
  }
  const i = r.inputs.findIndex((t) => t.name === "stream");
  const input = r.inputs[i];
  if (!input) return false;
  if (input.datatype !== "BOOL") throw bad("input 'stream' must have datatype BOOL", "inputs");
  const raw = r.raw_input_contents[i];
  const values = raw ? [...raw].map((b) => b !== 0) : (input.contents?.["bool_contents"] ?? []);
  if (values.length !== 1) throw bad("input 'stream' must hold one bool", "inputs.shape");
  return Boolean(values[0]);
}

function generateParameters(r: SamplingRequest): SamplingFields {
  const {
    max_tokens,
    temperature,
    top_p,
    top_k,
    min_p,
    repetition_penalty,
    seed,
    presence_penalty,
    frequency_penalty,
    priority,
    cache_salt,
  } = r;
  return {
    stop: r.stop,
    ...(max_tokens !== undefined ? { max_tokens } : {}),
    ...(temperature !== undefined ? { temperature } : {}),
    ...(top_p !== undefined ? { top_p } : {}),
    ...(top_k !== undefined ? { top_k } : {}),
    ...(min_p !== undefined ? { min_p } : {}),
    ...(repetition_penalty !== undefined ? { repetition_penalty } : {}),
    ...(seed !== undefined ? { seed } : {}),
    ...(presence_penalty !== undefined ? { presence_penalty } : {}),
    ...(frequency_penalty !== undefined ? { frequency_penalty } : {}),
    ...(priority !== undefined ? { priority } : {}),
    ...(cache_salt !== undefined && cache_salt !== null ? { cache_salt } : {}),
  };
}
