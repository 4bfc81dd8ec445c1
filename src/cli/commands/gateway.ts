import { createServer, type RequestListener } from "node:http";
import { hostname } from "node:os";
import type { Server as TlsServer } from "node:tls";
import { parseArgs } from "node:util";
import type { NatsConnection } from "@nats-io/transport-node";
import { Registry } from "prom-client";
import { type ExpertRunner, LocalExperts } from "../../engine/experts.ts";
import { parseKvCacheDtype } from "../../engine/kv-format.ts";
import { RemotePrefixStore } from "../../engine/kv-remote.ts";
import { heldExperts, loadWeights } from "../../engine/loader.ts";
import { SCHEDULING_POLICIES, type SchedulingPolicy } from "../../engine/scheduler.ts";
import {
  checkMtpTokens,
  checkNgramConfig,
  type SpeculativeConfig,
} from "../../engine/speculative.ts";
import { parseServeDtype } from "../../engine/weight-dtype.ts";
import { ApiKeys, parseApiKeys, readApiKeysFile } from "../../gateway/api-keys.ts";
import { buildGatewayApp } from "../../gateway/app.ts";
import { checkFilesDir } from "../../gateway/files.ts";
import { startGrpcGateway } from "../../gateway/grpc.ts";
import { exposition } from "../../gateway/metrics.ts";
import { PrefillClient, PrefillWorker } from "../../gateway/prefill.ts";
import { REASONING_PARSERS, type ReasoningParserName } from "../../gateway/reasoning.ts";
import {
  checkPrefixTiers,
  createServeContext,
  prefixTierLayout,
  probeShards,
  type ShardProbe,
} from "../../gateway/server.ts";
import { readServingTls, ServingCertificate } from "../../gateway/serving-tls.ts";
import { startingHandler } from "../../gateway/starting.ts";
import { TOOL_CALL_FORMATS, type ToolCallFormat } from "../../gateway/tool-calls.ts";
import { Checkpoint } from "../../model/checkpoint.ts";
import { modelArchitectureOf } from "../../model/config.ts";
import {
  describeSamplingDefaults,
  loadSamplingDefaults,
  parseGenerationConfigFlag,
} from "../../model/generation-config.ts";
import { Tokenizer } from "../../model/tokenizer.ts";
import { RemoteExperts } from "../../moe/dispatcher.ts";
import { connectNats, subscriptionRefused } from "../../moe/nats-connection.ts";
import { checkPlanFitsModel } from "../../moe/placement.ts";
import { decodePlanControl } from "../../moe/plan-control.ts";
import { parsePlan } from "../../moe/plan-json.ts";
import { subjects } from "../../moe/subjects.ts";
import { ExpertMeshError, formatError } from "../../util/errors.ts";
import { logFormat, processLog } from "../../util/log.ts";
import { packageVersion } from "../../util/version.ts";
import { selectBackend } from "../device.ts";
import {
  chatTemplateOption,
  defaultModelName,
  exitOnStall,
  intFlag as int,
  listenOn,
  loadStallFlag,
  NATS_AUTH_FLAGS,
  natsAuthFlags,
  natsAuthUsage,
  natsWaitFlag,
  numberFlag,
  portFlag,
  readOptionFile,
  subjectRef,
} from "../options.ts";
import { denseLoadBytes, loadProgress } from "../progress.ts";
import type { Command } from "../registry.ts";
import { Startup } from "../startup.ts";
import { stopSignals } from "../stop-signals.ts";
import { gatewayServer, gatewayTracing, publishQueueStats, stopGateway } from "./gateway-parts.ts";

/**
 * How often the gateway looks at its TLS and API keys files for a change: 10 s (the kubelet
 * itself takes up to a minute to update a mounted Secret); EM_FILE_RELOAD_INTERVAL_MS for
 * tests and for `up`, which rewrites them as its -f files change.
 */
function fileReloadIntervalMs(): number {
  const v = Number(process.env["EM_FILE_RELOAD_INTERVAL_MS"]);
  return Number.isFinite(v) && v >= 100 ? v : 10_000;
}

const USAGE = `expertmesh gateway --model DIR (--local | --nats URL --plan FILE) [options]
  --local                   routed experts in this process (single-process mode)
  --nats URL, --plan FILE   routed experts on shard processes over NATS (distributed mode)
${natsAuthUsage(26)}
  --nats-wait SECONDS       how long to wait at start for a NATS server not reachable yet (default 60)
  --load-stall-timeout S    give up loading the weights (exit, EM_CKPT_READ_STALLED) after this many
                            seconds without a byte read, so that a hung volume gets the pod restarted
                            (default 300; 0: never)
  --namespace NS, --model-name NAME   NATS subjects (default default, the folder name)
  --served-model-name NAME  the "model" clients ask for (default: --model-name)
  --served-model-alias NAME another name clients may ask for it by (repeatable; answers carry
                            --served-model-name; listed by /v1/models)
  --http-port PORT          OpenAI-compatible HTTP API (default 8000; 0 picks one)
  --metrics-port PORT       /metrics on its own port as well (default 9090; 0 picks one)
  --host ADDR               listen address (default 0.0.0.0)
  --max-queue-depth N       requests waiting for admission before 429 (default 64)
  --max-batch-tokens N      tokens per engine step, prefill chunks included (default 2048)
  --max-running N           sequences in the running batch (default 256)
  --scheduling-policy NAME  fcfs (default): requests run in arrival order, the newest is preempted
                            first when the KV cache runs short; priority: by the requests'
                            \`priority\` field (lower first, vLLM's), a waiting request preempts
                            running ones of lower priority that keep it out (docs/gateway.md)
  --priority-aging SECONDS  with --scheduling-policy priority: a waiting request counts as one
                            priority better per SECONDS since it arrived, so that higher ones
                            cannot keep it out for ever (default 0: no aging)
  --max-request-bytes N     largest request body (default 1048576)
  --stream-keepalive SECONDS  a streamed answer silent this long (waiting its turn, a long
                            prefill, a summary made first) gets a keepalive (an SSE comment; a
                            ping event on /v1/messages), so that proxies keep the connection
                            (default 15; 0: none)
  --shutdown-delay SECONDS  on SIGTERM, keep serving this long with /ready answering 503 before
                            stopping, so that a Service stops sending requests first (default 0;
                            the operator's pods use 5)
  --shutdown-timeout SECONDS  then wait this long for the requests in flight (HTTP and gRPC) to
                            end, and cut those still running (default 45: with the operator's 5 s
                            delay, within a pod's 60 s grace, leaving time to write the prefix
                            cache's disk tier and drain NATS)
  --max-model-len N         context length served (default: max_position_embeddings)
  --tokenizer-workers N     threads that encode long prompts (over 4 KiB) off the event loop,
                            each with its own copy of the tokenizer (default 1; 0: none)
  --tokenizer-cache-mib N   long chat prompts are encoded by pieces (cut after the template's
                            special tokens), this many MiB of them kept encoded, so that a
                            conversation sent again with a turn more encodes only what is
                            new (default 64; 0: none)
  --kv-cache-bytes N        KV cache budget (default 536870912)
  --kv-cache-dtype NAME     how KV cache rows are stored: float32 (default, exact), bfloat16
                            (half the bytes) or fp8 (DeepSeek FlashMLA's layout: e4m3 latent with
                            a scale per 128 values, bf16 rope part; 3.5x fewer bytes than float32)
  --block-size N            KV cache block, in tokens (default 16)
  --no-prefix-caching       compute every prompt in full (by default the KV cache blocks of
                            prompt prefixes seen before are reused: a shared system prompt is
                            computed once)
  --prefix-cache-disk DIR   a second tier under the prefix cache: blocks the KV cache forgets are
                            written to files in DIR (a folder per model and cache layout) and read
                            back instead of computed when a prompt starts with them again; the
                            blocks still cached are written at a graceful stop (SIGTERM), so a
                            restart finds them (ADR 0019). Clear DIR if the weights change in place
                            keeping their files' sizes and times
  --prefix-cache-disk-bytes N   the files' budget, least recently used go first (default 4294967296)
  --prefix-cache-disk-shared    other gateways use DIR too (a ReadWriteMany volume): blocks are
                            written as they are computed, and a prompt whose prefix another
                            gateway computed reads its files
  --prefix-cache-remote BUCKET  a second tier under the prefix cache on the NATS server (--nats;
                            JetStream on): blocks are written to the key-value bucket BUCKET
                            (made when missing) as they are computed, and a prompt whose prefix
                            any gateway of the model computed reads them (ADR 0028). With
                            --prefix-cache-disk, blocks are looked for on the disk first
  --prefix-cache-remote-bytes N the bucket's budget when this gateway makes it; the oldest blocks
                            go first (default 4294967296)
  --prefix-cache-remote-replicas N  copies of the bucket when this gateway makes it, on a NATS
                            cluster of at least N servers (default 1; 3 outlives a server)
  --disaggregation-mode M   null (default): this gateway computes its prompts; decode: prompts
                            lacking at least --disaggregation-min-tokens tokens in its prefix cache
                            go to the model's prefill gateways first (over NATS), and their blocks
                            are read from the bucket; prefill: also computes prompts for the decode
                            gateways. Both need --prefix-cache-remote, the same bucket (ADR 0029)
  --disaggregation-min-tokens N   decode: shorter remainders are computed here (default 512)
  --disaggregation-timeout S      decode: a prompt with no answer from a prefill gateway within S
                            seconds is computed here (default 60)
  --reasoning-parser NAME   deepseek-r1: chat answers carry the thinking (<think>...</think>) as
                            reasoning_content, apart from content; deepseek-v3 (V3.1's hybrid
                            thinking): only answers whose request sets chat_template_kwargs
                            {"thinking": true} do; none (default): as text
  --thinking-token-budget N the most tokens a thought may take when the request sets no budget
                            (thinking_token_budget, Anthropic's budget_tokens); a thought still
                            open then is closed and the answer follows (default: no bound)
  --speculative-tokens K    speculative decoding by prompt lookup: each decoding sequence runs up to
                            K guessed tokens (what followed its last tokens earlier in its prompt
                            or output) with its own in one step; outputs are unchanged
                            (default 0: off; at most 15)
  --speculative-method M    ngram (default: prompt lookup, as above) or mtp: the model's own
                            multi-token-prediction layer (DeepSeek-V3/R1) drafts K tokens per
                            step (default 1; past 1 the layer runs again on its own output);
                            its experts run where the others do (--local, or the shards of a
                            plan made with --mtp)
  --prompt-lookup-max N     longest run of last tokens looked up (default 4)
  --prompt-lookup-min N     shortest run that counts as a match (default 2)
  --responses-store N       responses kept in memory for previous_response_id and
                            GET /v1/responses/{id} (default 1000; 0: none), and as many
                            conversations (/v1/conversations); with --files-dir they are kept
                            in DIR/responses (for 30 days) and DIR/conversations (until
                            deleted) instead, found by every gateway on DIR and after a restart
  --files-dir DIR           serve OpenAI's Files and Batch APIs (/v1/files, /v1/batches): uploads,
                            batches and their outputs are kept in DIR, and a restart on the same
                            DIR goes on with the batches it finds (default: those routes refuse)
  --files-max-bytes N       largest upload to /v1/files (default 209715200, OpenAI's 200 MB)
  --files-max-total N       most bytes DIR may hold: an upload past it, or a new batch while it
                            is full, is refused (507 EM_GATEWAY_FILES_FULL) and batch lines wait
                            (default 0: no bound)
  --batch-concurrency N     a batch's lines in flight at once, over all batches (default 8;
                            with --scheduling-policy priority they run at priority 1000)
  --tool-call-parser NAME   the model's tool-call format: deepseek-v3 (V3, R1; default) or
                            deepseek-v3.1 (V3.1: the name, then raw JSON arguments)
  --generation-config auto|none|DIR   the sampling defaults of requests that leave a field out
                            (temperature, top_p, top_k, min_p, repetition_penalty): auto (default)
                            takes the model's generation_config.json (DeepSeek-V3's and R1's:
                            temperature 0.6, top_p 0.95), as vLLM does; none: the APIs' own
                            (temperature 1, top_p 1); DIR: DIR/generation_config.json
  --override-generation-config JSON   fields over those, e.g. '{"temperature": 0.3}'
  --chat-template FILE|TEMPLATE   the chat template (Jinja) chats are rendered with, in place of
                            tokenizer_config.json's: a file, or the template itself (vLLM's flag)
  --micro-batches 1|2       micro-batches in flight per step: 2 overlaps one half's expert round trip
                            with the other half's attention (default 1; see docs/gateway.md)
  --api-key KEY             accept this bearer key (repeatable; also $EM_API_KEYS, comma-separated)
  --api-keys-file FILE      accept the keys this file holds (separated by commas or line ends;
                            at least one); read again when it changes, so a key is added,
                            rotated or revoked without a restart (a change to no key, or an
                            unreadable file, keeps the previous keys)
  --log-requests            log a line per HTTP request when it ends: its x-request-id (the
                            client's, or a new one), route, status, time, and its tokens
                            (prompt, cached, completion), finish reasons and trace id (with
                            traces on); and per gRPC call its id, method, status and time
  --log-format text|json    log lines as text (default) or one JSON object per line
                            ({time, level, component, instance, msg, ...}: a request line's
                            fields as keys); default $EXPERTMESH_LOG_FORMAT, else text
  --wire bf16|fp8|f32       dispatch dtype on the wire (default bf16)
  --device DEV              where the dense layers (and --local experts) run: cpu (default),
                            cuda (= cuda:0) or cuda:N; ops the CUDA backend lacks run on the CPU.
                            cuda needs the native engine built with CUDA and a CUDA device;
                            sim is a stand-in for one, for tests (the CPU's kernels behind the
                            device paths: shards/README.md)
  --cpu-matmul fp32|bf16    how the CPU multiplies by bf16/fp8 weights: fp32 (default; activations
                            stay fp32) or bf16 (activations rounded to bf16, as PyTorch's bf16 Linear:
                            AMX tiles or AVX512_BF16 where the CPU has them, several times faster
                            prefill, ~1e-3 relative error; a CPU with neither keeps fp32)
  --batch-invariant         the CPU kernels that compute every token the same whatever shares
                            its step: a request's output no longer depends on the other
                            requests, its chunking or cached prefixes (same greedy tokens and
                            logprobs, bit for bit); slower prefill (docs/adr/0027); cpu only
  --backend NAME            native (default) | reference (TypeScript, cpu only)
  --dtype DTYPE             the linear layers' weights: auto (the checkpoint's, default), bf16,
                            fp16, fp32 or fp8 (DeepSeek-V3's 128x128 block-scaled e4m3),
                            converted as they load; embeddings, LM head, norms and router keep theirs
  --grpc-port PORT          KServe v2 gRPC API and streaming generation (off unless given; 0 picks one)
  --tls-cert FILE --tls-key FILE  serve the HTTP and gRPC APIs over TLS with this certificate
                            (PEM; the chain after it) and key; read again when the files
                            change (a renewal reaches new connections, no restart); the
                            metrics port stays plain HTTP
  --tls-client-ca FILE      with --tls-cert: mutual TLS, both APIs take only clients presenting
                            a certificate one of these CAs (PEM) signed; reloaded as above;
                            the metrics port answers /health and /ready for probes
  --otlp-traces-endpoint URL    OpenTelemetry traces over OTLP to this collector (http://host:4318,
                            or a full .../v1/traces URL; gRPC: http(s)://host:4317): a span per request
                            (GenAI semantic conventions: tokens, time to first token, queue time),
                            a child of the caller's W3C traceparent; a prefill gateway's span
                            joins the trace of the request it computes for. Without the flag,
                            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT turn
                            it on (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and
                            OTEL_EXPORTER_OTLP_HEADERS are honored; docs/gateway.md)
  --otlp-traces-protocol P  http/protobuf (default) or grpc; without it OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
                            or OTEL_EXPORTER_OTLP_PROTOCOL says
  --otlp-traces-sample-ratio R  of the requests without a sampled caller, the share traced (0 to 1,
                            default 1); a caller's sampling decision is always followed`;

export const gatewayCommand: Command = {
  name: "gateway",
  summary: "serve a model over an OpenAI-compatible HTTP API with continuous batching",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      allowNegative: true,
      options: {
        model: { type: "string" },
        local: { type: "boolean" },
        plan: { type: "string" },
        nats: { type: "string" },
        ...NATS_AUTH_FLAGS,
        "nats-wait": { type: "string" },
        "load-stall-timeout": { type: "string" },
        namespace: { type: "string" },
        "model-name": { type: "string" },
        "served-model-name": { type: "string" },
        "served-model-alias": { type: "string", multiple: true },
        "http-port": { type: "string" },
        "grpc-port": { type: "string" },
        "tls-cert": { type: "string" },
        "tls-key": { type: "string" },
        "tls-client-ca": { type: "string" },
        "metrics-port": { type: "string" },
        host: { type: "string" },
        "max-queue-depth": { type: "string" },
        "max-batch-tokens": { type: "string" },
        "max-running": { type: "string" },
        "scheduling-policy": { type: "string" },
        "priority-aging": { type: "string" },
        "stream-keepalive": { type: "string" },
        "max-request-bytes": { type: "string" },
        "shutdown-delay": { type: "string" },
        "shutdown-timeout": { type: "string" },
        dtype: { type: "string" },
        "max-model-len": { type: "string" },
        "tokenizer-workers": { type: "string" },
        "tokenizer-cache-mib": { type: "string" },
        "kv-cache-bytes": { type: "string" },
        "kv-cache-dtype": { type: "string" },
        "responses-store": { type: "string" },
        "files-dir": { type: "string" },
        "files-max-bytes": { type: "string" },
        "files-max-total": { type: "string" },
        "batch-concurrency": { type: "string" },
        "block-size": { type: "string" },
        "prefix-caching": { type: "boolean" },
        "prefix-cache-disk": { type: "string" },
        "prefix-cache-disk-bytes": { type: "string" },
        "prefix-cache-disk-shared": { type: "boolean" },
        "prefix-cache-remote": { type: "string" },
        "prefix-cache-remote-bytes": { type: "string" },
        "prefix-cache-remote-replicas": { type: "string" },
        "disaggregation-mode": { type: "string" },
        "disaggregation-min-tokens": { type: "string" },
        "disaggregation-timeout": { type: "string" },
        "micro-batches": { type: "string" },
        "reasoning-parser": { type: "string" },
        "thinking-token-budget": { type: "string" },
        "tool-call-parser": { type: "string" },
        "generation-config": { type: "string" },
        "chat-template": { type: "string" },
        "override-generation-config": { type: "string" },
        "speculative-tokens": { type: "string" },
        "speculative-method": { type: "string" },
        "prompt-lookup-max": { type: "string" },
        "prompt-lookup-min": { type: "string" },
        "api-key": { type: "string", multiple: true },
        "api-keys-file": { type: "string" },
        "log-requests": { type: "boolean" },
        wire: { type: "string" },
        device: { type: "string" },
        "cpu-matmul": { type: "string" },
        "batch-invariant": { type: "boolean" },
        backend: { type: "string" },
        "log-format": { type: "string" },
        "otlp-traces-endpoint": { type: "string" },
        "otlp-traces-sample-ratio": { type: "string" },
        "otlp-traces-protocol": { type: "string" },
      },
    });
    const usage = (m: string): never => {
      throw new ExpertMeshError("EM_CLI_USAGE", m);
    };
    if (!values.model) usage("--model is required");
    if (!values.local && (!values.nats || !values.plan))
      usage("give --local (experts in process) or --nats and --plan (experts on shards)");
    const wire = values.wire ?? "bf16";
    if (wire !== "bf16" && wire !== "fp8" && wire !== "f32")
      usage(`--wire must be bf16, fp8 or f32, got '${wire}'`);
    const microBatches = int(values["micro-batches"], "--micro-batches", 1);
    const schedulingPolicy = values["scheduling-policy"] ?? "fcfs";
    if (!(SCHEDULING_POLICIES as readonly string[]).includes(schedulingPolicy))
      usage(
        `--scheduling-policy must be ${SCHEDULING_POLICIES.join(" or ")}, got ${schedulingPolicy}`,
      );
    const priorityAgingS = numberFlag(values["priority-aging"], "--priority-aging", 0);
    const keepaliveS = numberFlag(values["stream-keepalive"], "--stream-keepalive", 15);
    if (priorityAgingS > 0 && schedulingPolicy !== "priority")
      usage(
        `--priority-aging needs --scheduling-policy priority (requests run in arrival order under ${schedulingPolicy})`,
      );
    if (microBatches > 2) usage(`--micro-batches must be 1 or 2, got ${microBatches}`);
    if (
      values["prefix-cache-disk-bytes"] !== undefined &&
      values["prefix-cache-disk"] === undefined
    )
      usage("--prefix-cache-disk-bytes needs --prefix-cache-disk DIR");
    if (values["prefix-cache-disk-shared"] === true && values["prefix-cache-disk"] === undefined)
      usage("--prefix-cache-disk-shared needs --prefix-cache-disk DIR");
    const remoteBucket = values["prefix-cache-remote"];
    for (const flag of ["prefix-cache-remote-bytes", "prefix-cache-remote-replicas"] as const)
      if (values[flag] !== undefined && remoteBucket === undefined)
        usage(`--${flag} needs --prefix-cache-remote BUCKET`);
    checkPrefixTiers({
      disk: values["prefix-cache-disk"] !== undefined,
      diskShared: values["prefix-cache-disk-shared"] === true,
      remote: remoteBucket !== undefined,
      prefixCaching: values["prefix-caching"] !== false,
    });
    if (remoteBucket !== undefined && !values.nats)
      usage(
        "--prefix-cache-remote needs --nats URL (with --local too: the server that keeps the blocks)",
      );
    const disaggregation = values["disaggregation-mode"] ?? "null";
    if (disaggregation !== "null" && disaggregation !== "prefill" && disaggregation !== "decode")
      usage(`--disaggregation-mode must be null, prefill or decode, got '${disaggregation}'`);
    if (disaggregation !== "null" && remoteBucket === undefined)
      usage(
        `--disaggregation-mode ${disaggregation} needs --prefix-cache-remote BUCKET: the prompts' blocks go through it`,
      );
    for (const flag of ["disaggregation-min-tokens", "disaggregation-timeout"] as const)
      if (values[flag] !== undefined && disaggregation !== "decode")
        usage(`--${flag} needs --disaggregation-mode decode`);
    const disaggMinTokens = int(
      values["disaggregation-min-tokens"],
      "--disaggregation-min-tokens",
      512,
    );
    const disaggTimeoutS = numberFlag(
      values["disaggregation-timeout"],
      "--disaggregation-timeout",
      60,
    );
    if (!(disaggTimeoutS > 0))
      usage(`--disaggregation-timeout must be above 0, got ${disaggTimeoutS}`);
    const specTokens = int(values["speculative-tokens"], "--speculative-tokens", 0, 0);
    const kvCacheDtype = parseKvCacheDtype(values["kv-cache-dtype"] ?? "float32");
    const responsesStore = int(values["responses-store"], "--responses-store", 1000, 0);
    const filesDir = values["files-dir"];
    if (filesDir === undefined)
      for (const flag of ["files-max-bytes", "files-max-total", "batch-concurrency"] as const)
        if (values[flag] !== undefined) usage(`--${flag} needs --files-dir DIR`);
    if (filesDir !== undefined) checkFilesDir(filesDir); // (before minutes of loading)
    const files =
      filesDir === undefined
        ? undefined
        : {
            dir: filesDir,
            maxBytes: int(values["files-max-bytes"], "--files-max-bytes", 200 * 2 ** 20),
            maxTotalBytes: int(values["files-max-total"], "--files-max-total", 0, 0),
            batchConcurrency: int(values["batch-concurrency"], "--batch-concurrency", 8),
          };
    const specMethod = values["speculative-method"] ?? "ngram";
    if (specMethod !== "ngram" && specMethod !== "mtp")
      usage(`--speculative-method must be ngram or mtp, got '${specMethod}'`);
    const mtp = specMethod === "mtp";
    const speculative: SpeculativeConfig | undefined = mtp
      ? { method: "mtp", numTokens: checkMtpTokens(specTokens || 1) }
      : specTokens > 0
        ? checkNgramConfig({
            numTokens: specTokens,
            maxN: int(values["prompt-lookup-max"], "--prompt-lookup-max", 4),
            minN: int(values["prompt-lookup-min"], "--prompt-lookup-min", 2),
          })
        : undefined;
    const httpPort = portFlag(values["http-port"], "--http-port", 8000);
    const grpcPort =
      values["grpc-port"] === undefined
        ? undefined
        : portFlag(values["grpc-port"], "--grpc-port", 0);
    const metricsPort = portFlag(values["metrics-port"], "--metrics-port", 9090);
    if ((values["tls-cert"] === undefined) !== (values["tls-key"] === undefined))
      usage(
        values["tls-cert"] === undefined
          ? "--tls-key needs --tls-cert: a key without its certificate"
          : "--tls-cert needs --tls-key: a certificate without its key",
      );
    if (values["tls-client-ca"] !== undefined && values["tls-cert"] === undefined)
      usage(
        "--tls-client-ca needs --tls-cert and --tls-key: clients are verified by a server that serves TLS",
      );
    const tlsFiles =
      values["tls-cert"] !== undefined
        ? { cert: values["tls-cert"], key: values["tls-key"]!, clientCa: values["tls-client-ca"] }
        : undefined;
    // Checked before the weights load: a wrong file fails at once.
    const servingTls = tlsFiles && readServingTls(tlsFiles);
    const keysFile = values["api-keys-file"];
    const apiKeys = new ApiKeys(
      [...(values["api-key"] ?? []), ...parseApiKeys(process.env["EM_API_KEYS"] ?? "")],
      keysFile === undefined ? [] : readApiKeysFile(keysFile),
    );
    const natsWaitMs = natsWaitFlag(values["nats-wait"]);
    const stallSeconds = loadStallFlag(values["load-stall-timeout"]);
    const dtype = parseServeDtype(values.dtype);
    const shutdownDelayS = numberFlag(values["shutdown-delay"], "--shutdown-delay", 0);
    if (shutdownDelayS > 300)
      usage(`--shutdown-delay must be at most 300 s, got ${shutdownDelayS}`);
    const shutdownTimeoutS = numberFlag(values["shutdown-timeout"], "--shutdown-timeout", 45);
    if (shutdownTimeoutS > 3600)
      usage(`--shutdown-timeout must be at most 3600 s, got ${shutdownTimeoutS}`);
    const modelDir = values.model!;
    const modelName = values["model-name"] ?? defaultModelName(modelDir);
    const chatTemplate =
      values["chat-template"] === undefined
        ? undefined
        : chatTemplateOption(values["chat-template"]);
    // Before the weights: a bad file or override fails at once.
    const generationConfig = loadSamplingDefaults(
      modelDir,
      parseGenerationConfigFlag(values["generation-config"]),
      values["override-generation-config"],
    );
    // On NATS the names become subject tokens; alone (--local) they only name things.
    const ref = values.local
      ? { namespace: values.namespace ?? "default", model: modelName }
      : subjectRef(values.namespace ?? "default", modelName);
    const id = process.env["POD_NAME"] ?? `${hostname()}-${process.pid}`;
    const log = processLog({
      format: logFormat(values["log-format"]),
      component: "gateway",
      instance: id,
      who: `gateway ${id}`,
    });
    const tracing = gatewayTracing({
      endpoint: values["otlp-traces-endpoint"],
      sampleRatio: values["otlp-traces-sample-ratio"],
      protocol: values["otlp-traces-protocol"],
      id,
      ref,
      prefill: disaggregation === "prefill",
      log,
    });
    const signals = stopSignals(log);

    const selected = selectBackend(
      values.backend,
      values.device,
      values["cpu-matmul"],
      values["batch-invariant"] === true,
    );
    const backend = selected.backend;
    log(selected.summary);
    // The files the options name, before the weights: a wrong path fails at once.
    const planText = values.plan && readOptionFile(values.plan, "--plan").toString("utf8");
    const natsAuth = natsAuthFlags(values);
    // The ports first: liveness is answered while the weights load (minutes, for a real
    // model), /ready says which step startup is on, and requests get EM_GATEWAY_STARTING.
    const host = values.host ?? "0.0.0.0";
    const startupRegistry = new Registry();
    const startup = new Startup({ role: "gateway", registry: startupRegistry });
    startup.watchStalls(stallSeconds, exitOnStall(log));
    let handle: RequestListener = startingHandler(startup, startupRegistry);
    const server = gatewayServer(servingTls, () => handle);
    await listenOn(server, httpPort, host, "--http-port");
    const scheme = servingTls ? "https" : "http";
    // One certificate for both APIs; a renewal reaches new connections.
    const certificate = servingTls && new ServingCertificate(servingTls);
    if (certificate && tlsFiles) {
      log(`TLS on the HTTP and gRPC APIs: ${servingTls.summary}`);
      certificate.onChange((next) =>
        (server as unknown as Pick<TlsServer, "setSecureContext">).setSecureContext({
          cert: next.cert,
          key: next.key,
          ...(next.clientCa ? { ca: next.clientCa } : {}),
        }),
      );
      certificate.watch(tlsFiles, fileReloadIntervalMs(), log);
    }
    if (keysFile !== undefined) {
      log(`API keys: ${apiKeys.count} accepted, from ${keysFile} too (read again when it changes)`);
      apiKeys.watch(keysFile, fileReloadIntervalMs(), log);
    }
    let metricsRegistry = startupRegistry;
    // /health and /ready here too: the kubelet's probes present no client certificate, so
    // with mutual TLS they ask this port (plain HTTP, as Prometheus).
    const metricsServer = createServer(async (req, res) => {
      const path = req.url?.split("?")[0];
      if (path === "/health" || path === "/ready") return handle(req, res);
      const { contentType, body } = await exposition(metricsRegistry, req.headers.accept);
      res.writeHead(200, { "content-type": contentType }).end(body);
    });
    await listenOn(metricsServer, metricsPort, host, "--metrics-port");
    const port = (s: { address(): unknown }) => (s.address() as { port: number }).port;
    log(
      `starting; /health and /ready on ${scheme}://${host}:${port(server)}, metrics on :${port(metricsServer)}`,
    );

    const ckpt = await Checkpoint.open(modelDir, { mtp, onFile: (d, n) => startup.opening(d, n) });
    // Shards of these weights only (ADR 0035): another model's never add into our sums.
    const weightsId = await ckpt.weightsDigest();
    startup.weights(weightsId);
    const shardsRef = { ...ref, weights: weightsId };
    const tokenizer = Tokenizer.load(modelDir, chatTemplate);
    if (chatTemplate !== undefined) {
      // A template that cannot render a one-message chat would fail every chat request.
      tokenizer.applyChatTemplate([{ role: "user", content: "Hello" }], true);
      log(`chat template from --chat-template (${Buffer.byteLength(chatTemplate)} bytes)`);
    }
    const totalLayers = ckpt.config.numHiddenLayers + (mtp ? 1 : 0);
    const loadBytes = denseLoadBytes(ckpt, values.local === true);
    const base = ckpt.bytesRead;
    startup.bytes(() => ckpt.bytesRead - base, loadBytes);
    startup.loading("layers", 0, totalLayers);
    const progress = loadProgress({
      unit: "layers",
      total: totalLayers,
      totalBytes: loadBytes,
      bytesRead: () => ckpt.bytesRead,
      human: (done, total) => log(`loading weights: layer ${done}/${total}`),
    });
    const weights = await loadWeights(
      ckpt,
      values.local ? "all" : "none",
      (done, total) => {
        progress.update(done, total);
        startup.loading("layers", done, total);
      },
      { mtp, dtype },
    );
    progress.finish();
    if (dtype !== "auto") log(`linear layers served in ${dtype} (converted from the checkpoint's)`);
    let experts: ExpertRunner;
    let nc: NatsConnection | null = null;
    const connectToNats = () =>
      connectNats({
        url: values.nats!,
        name: `expertmesh-gateway-${id}`,
        auth: natsAuth,
        inboxPrefix: subjects.inboxPrefix(ref),
        onPermissionDenied: (e) => {
          if (e.operation === "subscription")
            signals.fail(subscriptionRefused(e, subjects.all(ref)));
        },
        waitMs: natsWaitMs,
        log,
      });
    let ready: () => Promise<boolean> = async () => true;
    let lastProbe: ShardProbe | null = null;
    let onRoundTrip: ((shard: number, ms: number, ok: boolean) => void) | undefined;
    if (values.local) {
      experts = new LocalExperts(backend, heldExperts(weights));
    } else {
      const plan = parsePlan(planText!);
      checkPlanFitsModel(
        plan,
        modelArchitectureOf(weights.config),
        values.plan!,
        weights.config.numNextnPredictLayers,
      );
      const mtpLayer = weights.config.numHiddenLayers;
      if (mtp && !plan.moeLayers.includes(mtpLayer))
        usage(
          `--speculative-method mtp: the plan ${values.plan} does not place the MTP layer's experts (layer ${mtpLayer}); make it with \`expertmesh plan --mtp\``,
        );
      startup.step(`connecting to NATS at ${values.nats}`);
      nc = await connectToNats();
      experts = new RemoteExperts({
        nc,
        model: shardsRef,
        plan,
        dispatchDtype: wire as "bf16" | "fp8" | "f32",
        combineDtype: wire === "f32" ? "f32" : "bf16",
        onRoundTrip: (shard, ms, ok) => onRoundTrip?.(shard, ms, ok),
        batchInvariant: values["batch-invariant"] === true,
      });
      const conn = nc;
      const remote = experts as RemoteExperts;
      ready = async () => {
        lastProbe = await probeShards(conn, shardsRef, remote.plan, weights.config.hiddenSize);
        return lastProbe.ready;
      };
      // Live plan changes from the operator (ADR 0003): switch when told to activate.
      conn.subscribe(subjects.planControl(ref), {
        callback: (err, msg) => {
          if (err) return;
          try {
            const c = decodePlanControl(msg.data);
            if (c.op === "activate" && remote.setPlan(c.plan))
              log(`routing with plan v${c.plan.version}`);
          } catch (e) {
            log(`ignoring plan control message: ${formatError(e)}`);
          }
        },
      });
    }
    const tokenizerWorkers = int(values["tokenizer-workers"], "--tokenizer-workers", 1, 0);
    const tokenizerCacheMiB = numberFlag(
      values["tokenizer-cache-mib"],
      "--tokenizer-cache-mib",
      64,
    );
    if (tokenizerWorkers > 64)
      usage(`--tokenizer-workers must be at most 64, got ${tokenizerWorkers}`);
    const maxModelLen = values["max-model-len"];
    const reasoningParser = values["reasoning-parser"] ?? "none";
    if (!(REASONING_PARSERS as readonly string[]).includes(reasoningParser))
      usage(`--reasoning-parser must be ${REASONING_PARSERS.join(", ")}, got ${reasoningParser}`);
    const thinkingBudget =
      values["thinking-token-budget"] === undefined
        ? undefined
        : int(values["thinking-token-budget"], "--thinking-token-budget", 0, 0);
    const toolCallParser = values["tool-call-parser"] ?? "deepseek-v3";
    if (!(TOOL_CALL_FORMATS as readonly string[]).includes(toolCallParser))
      usage(`--tool-call-parser must be ${TOOL_CALL_FORMATS.join(", ")}, got ${toolCallParser}`);
    const { defaults: samplingDefaults, file: generationFile } = generationConfig;
    if (Object.keys(samplingDefaults).length > 0)
      log(
        `sampling defaults of requests that leave them out: ${describeSamplingDefaults(samplingDefaults)}` +
          (generationFile
            ? ` (${generationFile}; --generation-config none for the APIs' own)`
            : ""),
      );
    // What the prefix cache's second tier's rows depend on besides the cache's layout.
    const tierIdentity = {
      version: packageVersion(),
      weights: weightsId,
      mtp,
      dtype,
      cpuMatmul: values["cpu-matmul"] ?? "fp32",
      // The kernels that run (ISA, and a bf16 matmul this CPU cannot do).
      backendSummary: selected.summary.replace(/, \d+ threads?/, ""),
      device: selected.device,
      backend: values.backend ?? "native",
      // The experts' activations cross the wire in this dtype (distributed mode).
      wire: values.local ? null : wire,
    };
    const blockSize = int(values["block-size"], "--block-size", 16);
    let prefixCacheRemote: RemotePrefixStore | undefined;
    if (remoteBucket !== undefined) {
      if (!nc) {
        startup.step(`connecting to NATS at ${values.nats} (the prefix cache's blocks)`);
        nc = await connectToNats();
      }
      startup.step(`opening the prefix cache's bucket '${remoteBucket}'`);
      prefixCacheRemote = await RemotePrefixStore.open({
        nc,
        bucket: remoteBucket,
        maxBytes: int(
          values["prefix-cache-remote-bytes"],
          "--prefix-cache-remote-bytes",
          4 * 2 ** 30,
        ),
        replicas: int(
          values["prefix-cache-remote-replicas"],
          "--prefix-cache-remote-replicas",
          1,
          1,
        ),
        ...prefixTierLayout(
          weights.config,
          { blockSize, kvCacheDtype, ...(speculative ? { speculative } : {}) },
          tierIdentity,
        ),
        log,
      });
      log(
        `prefix cache NATS tier in bucket '${remoteBucket}': ${prefixCacheRemote.stats.files} blocks of this model there, budget ${(prefixCacheRemote.maxBytes / 2 ** 20).toFixed(1)} MiB`,
      );
    }
    // Prefill jobs' subject: its names are subject tokens (with --local too); prefill gateways
    // of these weights only (ADR 0035: another model's would refuse every job).
    const prefillSubject =
      disaggregation === "null"
        ? ""
        : subjects.prefill({
            ...subjectRef(values.namespace ?? "default", modelName),
            weights: weightsId,
          });
    const prefillClient =
      disaggregation === "decode"
        ? new PrefillClient({
            nc: nc!,
            subject: prefillSubject,
            store: prefixCacheRemote!,
            minTokens: disaggMinTokens,
            timeoutMs: disaggTimeoutS * 1000,
            log,
          })
        : undefined;
    const ctx = createServeContext(weights, backend, experts, tokenizer, {
      ...(prefillClient ? { prefillOffload: prefillClient } : {}),
      ...(tracing ? { tracing } : {}),
      servedModelName: values["served-model-name"] ?? modelName,
      modelAliases: [...new Set(values["served-model-alias"] ?? [])].filter(
        (a) => a !== (values["served-model-name"] ?? modelName),
      ),
      samplingDefaults,
      ...(maxModelLen !== undefined ? { maxModelLen: int(maxModelLen, "--max-model-len", 0) } : {}),
      maxBatchTokens: int(values["max-batch-tokens"], "--max-batch-tokens", 2048),
      maxQueueDepth: int(values["max-queue-depth"], "--max-queue-depth", 64),
      maxRunning: int(values["max-running"], "--max-running", 256),
      kvCacheBytes: int(values["kv-cache-bytes"], "--kv-cache-bytes", 512 * 2 ** 20),
      kvCacheDtype,
      blockSize,
      microBatches,
      ...(prefixCacheRemote ? { prefixCacheRemote } : {}),
      prefixCaching: values["prefix-caching"] !== false,
      ...(values["prefix-cache-disk"] !== undefined
        ? {
            prefixCacheDisk: {
              dir: values["prefix-cache-disk"],
              bytes: int(
                values["prefix-cache-disk-bytes"],
                "--prefix-cache-disk-bytes",
                4 * 2 ** 30,
              ),
              identity: tierIdentity,
              ...(values["prefix-cache-disk-shared"] === true ? { shared: true } : {}),
              // Read in the step, as before read-ahead: the bench's peer (bench/disk-read.ts).
              ...(process.env["EXPERTMESH_PREFIX_DISK_READ_AHEAD"] === "0"
                ? { readAhead: false }
                : {}),
            },
          }
        : {}),
      schedulingPolicy: schedulingPolicy as SchedulingPolicy,
      ...(priorityAgingS > 0 ? { priorityAgingMs: priorityAgingS * 1000 } : {}),
      streamKeepaliveMs: Math.round(keepaliveS * 1000),
      tokenizerWorkers,
      tokenizerCacheBytes: Math.round(tokenizerCacheMiB * 2 ** 20),
      reasoningParser: reasoningParser as ReasoningParserName,
      ...(thinkingBudget !== undefined ? { thinkingTokenBudget: thinkingBudget } : {}),
      toolCallParser: toolCallParser as ToolCallFormat,
      ...(speculative ? { speculative } : {}),
      log,
    });
    onRoundTrip = (shard, ms, ok) =>
      ctx.metrics.dispatchLatency.observe({ shard: String(shard), ok: String(ok) }, ms / 1000);
    const maxRequestBytes = int(values["max-request-bytes"], "--max-request-bytes", 1 << 20);
    startup.register(ctx.metrics.registry);
    // From SIGTERM on, with --shutdown-delay: still serving, but not ready.
    let draining = false;
    const serveReady = async () => !draining && (await ready());
    let appHandler: RequestListener | null = null;
    const app = buildGatewayApp({
      ctx,
      apiKeys,
      maxRequestBytes,
      ready: serveReady,
      draining: () => draining,
      notReadyDetail: () => (lastProbe?.ready === false ? { shards: lastProbe.failed } : undefined),
      responsesStore,
      ...(files ? { files } : {}),
      server,
      ...(values["log-requests"] ? { logRequest: log } : {}),
      onHandler: (h) => {
        appHandler = h;
      },
    });
    await app.ready();
    const grpc =
      grpcPort === undefined
        ? null
        : await startGrpcGateway(
            {
              ctx,
              ready: serveReady,
              apiKeys,
              maxRequestBytes,
              ...(values["log-requests"] ? { logRequest: log } : {}),
            },
            { port: grpcPort, host, ...(certificate ? { tls: certificate } : {}) },
          );

    handle = appHandler!;
    metricsRegistry = ctx.metrics.registry;
    const prefillWorker =
      disaggregation === "prefill"
        ? new PrefillWorker({
            nc: nc!,
            subject: prefillSubject,
            id,
            engine: ctx.engine,
            fingerprint: prefixCacheRemote!.fingerprint,
            vocabSize: ctx.vocabSize,
            maxModelLen: ctx.maxModelLen,
            ...(tracing ? { tracing } : {}),
            log,
          })
        : undefined;
    if (prefillClient || prefillWorker)
      ctx.metrics.addPrefill({
        ...(prefillClient ? { client: () => prefillClient.stats } : {}),
        ...(prefillWorker ? { worker: () => prefillWorker.stats } : {}),
      });
    startup.finish();
    if (disaggregation !== "null")
      log(
        disaggregation === "prefill"
          ? `prefill gateway: computing prompts sent to ${prefillSubject}`
          : `decode gateway: prompts lacking ${disaggMinTokens} tokens or more go to ${prefillSubject}`,
      );
    log(
      `serving '${ctx.servedModelName}' on ${scheme}://${host}:${port(server)} ` +
        `(${values.local ? "single-process" : `${ref.namespace}/${ref.model} over ${values.nats}`}); metrics on :${port(metricsServer)}` +
        (grpc ? `; gRPC (KServe v2) on :${grpc.port}` : "") +
        `; weights ${weightsId} (started in ${startup.elapsedSeconds.toFixed(1)} s)`,
    );
    const statsTimer = publishQueueStats({
      nc: () => nc,
      ref,
      id,
      role: disaggregation === "prefill" ? "prefill" : "gateway",
      engine: ctx.engine,
      offloadsPrefill: prefillClient !== undefined,
      planVersion: () => (experts instanceof RemoteExperts ? experts.plan.version : undefined),
    });
    const tierName = [
      values["prefix-cache-disk"],
      remoteBucket === undefined ? undefined : `bucket '${remoteBucket}'`,
    ]
      .filter((t) => t !== undefined)
      .join(" and ");
    const stop = stopGateway({
      log,
      delayS: shutdownDelayS,
      timeoutS: shutdownTimeoutS,
      drain: () => {
        draining = true;
      },
      server,
      stopWatching: () => {
        clearInterval(statsTimer);
        certificate?.stop();
        apiKeys.stop();
      },
      // Prefill jobs taken are finished and answered (decode gateways wait for them).
      closeServing: () =>
        Promise.all([app.close(), grpc?.close(shutdownTimeoutS * 1000), prefillWorker?.close()]),
      closeAfter: async () => {
        prefillClient?.close();
        // The last requests' spans go out before the process does.
        await tracing?.shutdown();
        await ctx.encoder.close();
      },
      prefixTiers:
        tierName === ""
          ? null
          : {
              name: tierName,
              persist: () => ctx.engine.persistPrefixes(),
              close: () => ctx.engine.close(),
            },
      metricsServer,
      nc: () => nc,
    });
    signals.serving((why) => void stop(why));
    await new Promise(() => {});
    return 0;
  },
};
