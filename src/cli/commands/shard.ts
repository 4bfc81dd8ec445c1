import { createServer } from "node:http";
import { hostname } from "node:os";
import { parseArgs } from "node:util";
import type { NatsConnection } from "@nats-io/transport-node";
import { Counter, Gauge, Registry } from "prom-client";
import { loadExperts } from "../../engine/loader.ts";
import { registerScratchGauge, scratchTrimmerFor } from "../../engine/scratch-trim.ts";
import { parseServeDtype } from "../../engine/weight-dtype.ts";
import { Checkpoint } from "../../model/checkpoint.ts";
import { modelArchitectureOf } from "../../model/config.ts";
import { connectNats, outageClock, subscriptionRefused } from "../../moe/nats-connection.ts";
import { checkPlanFitsModel } from "../../moe/placement.ts";
import { parsePlan } from "../../moe/plan-json.ts";
import { ShardServer } from "../../moe/shard-server.ts";
import { PREVIOUS_WEIGHTS_ENV, subjects } from "../../moe/subjects.ts";
import { ExpertMeshError, formatError } from "../../util/errors.ts";
import { logFormat, processLog } from "../../util/log.ts";
import { selectBackend } from "../device.ts";
import {
  defaultModelName,
  exitOnStall,
  listenOn,
  loadStallFlag,
  NATS_AUTH_FLAGS,
  natsAuthFlags,
  natsAuthUsage,
  natsWaitFlag,
  portFlag,
  readOptionFile,
  subjectRef,
} from "../options.ts";
import { expertLoad, loadProgress } from "../progress.ts";
import type { Command } from "../registry.ts";
import { Startup } from "../startup.ts";
import { stopSignals } from "../stop-signals.ts";

/**
 * /readyz answers 503 once the NATS server has been gone this long (a blip, or a server
 * restarting, stays ready): the Deployment's ready count, and the model's status, then show
 * the shards that cannot serve, as when a rotated password is refused.
 */
const NATS_OUTAGE_NOT_READY_MS = 10_000;

const USAGE = `expertmesh shard --model DIR --plan FILE --shard K --nats URL [options]
${natsAuthUsage(22)}
  --nats-wait SECONDS   how long to wait at start for a NATS server not reachable yet (default 60)
  --load-stall-timeout SECONDS
                        give up loading the weights (exit, EM_CKPT_READ_STALLED) after this many
                        seconds without a byte read, so that a hung volume gets the pod restarted
                        (default 300; 0: never)
  --namespace NS        model namespace in NATS subjects (default default)
  --model-name NAME     model name in NATS subjects (default: the model folder's name)
  --id ID               this replica's id in load reports (default hostname-pid)
  --metrics-port PORT   /metrics, /healthz, /readyz (default 9090; 0 picks one); /readyz is 503
                        while starting, draining, or 10 s after the NATS server was lost
  --device DEV          where the experts run: cpu (default), cuda (= cuda:0) or cuda:N; ops
                        the CUDA backend lacks run on the CPU. cuda needs the native engine
                        built with CUDA (EM_CUDA=ON shards/build.sh) and a CUDA device;
                        sim is a stand-in for one, for tests (shards/README.md)
  --cpu-matmul fp32|bf16  how the CPU multiplies by bf16/fp8 weights: fp32 (default) or bf16
                        (activations rounded to bf16: AMX tiles or AVX512_BF16 where the CPU
                        has them, several times faster on many tokens; see gateway --help)
  --batch-invariant     kernels that compute each token the same whatever tokens share its
                        call (a distributed gateway's --batch-invariant needs its shards so;
                        see gateway --help; cpu only)
  --backend NAME        native (default) | reference (TypeScript, cpu only)
  --dtype DTYPE         the experts' weights: auto (the checkpoint's, default), bf16, fp16, fp32
                        or fp8 (DeepSeek-V3's 128x128 block-scaled e4m3), converted as they load
  --log-format text|json  log lines as text (default) or one JSON object per line (see gateway
                        --help); default $EXPERTMESH_LOG_FORMAT, else text`;

export const shardCommand: Command = {
  name: "shard",
  summary: "serve one expert shard: its experts' weights, over NATS (queue group shard-K)",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        "log-format": { type: "string" },
        model: { type: "string" },
        plan: { type: "string" },
        shard: { type: "string" },
        nats: { type: "string" },
        ...NATS_AUTH_FLAGS,
        "nats-wait": { type: "string" },
        "load-stall-timeout": { type: "string" },
        namespace: { type: "string" },
        "model-name": { type: "string" },
        id: { type: "string" },
        "metrics-port": { type: "string" },
        device: { type: "string" },
        "cpu-matmul": { type: "string" },
        "batch-invariant": { type: "boolean" },
        backend: { type: "string" },
        dtype: { type: "string" },
      },
    });
    const usage = (m: string): never => {
      throw new ExpertMeshError("EM_CLI_USAGE", m);
    };
    if (!values.model || !values.plan || values.shard === undefined || !values.nats)
      usage("--model, --plan, --shard and --nats are required");
    const metricsPort = portFlag(values["metrics-port"], "--metrics-port", 9090);
    const natsWaitMs = natsWaitFlag(values["nats-wait"]);
    const stallSeconds = loadStallFlag(values["load-stall-timeout"]);
    const dtype = parseServeDtype(values.dtype);
    const model = subjectRef(
      values.namespace ?? "default",
      values["model-name"] ?? defaultModelName(values.model!),
    );
    // Before reading anything: a device that is not there fails at once (pods restart).
    const selected = selectBackend(
      values.backend,
      values.device,
      values["cpu-matmul"],
      values["batch-invariant"] === true,
    );
    const plan = parsePlan(readOptionFile(values.plan!, "--plan").toString("utf8"));
    const natsAuth = natsAuthFlags(values);
    const k = /^\d+$/.test(values.shard!) ? Number(values.shard) : -1;
    if (k < 0 || k >= plan.numShards)
      usage(`--shard must be 0..${plan.numShards - 1}, got '${values.shard}'`);
    const id = values.id ?? `${hostname()}-${process.pid}`;
    const log = processLog({
      format: logFormat(values["log-format"]),
      component: "shard",
      instance: id,
      who: `shard ${k}/${id}`,
    });
    const signals = stopSignals(log);

    // The probe port first: liveness is answered while the experts load (minutes, for a
    // real model), and /readyz says which step startup is on.
    const registry = new Registry();
    const startup = new Startup({ role: "shard", registry });
    startup.watchStalls(stallSeconds, exitOnStall(log));
    let nc: NatsConnection | null = null;
    let natsOutage = () => 0;
    let draining = false;
    let sync = () => {};
    const http = createServer(async (req, res) => {
      const url = (req.url ?? "").split("?")[0];
      if (url === "/healthz") res.writeHead(200).end("ok\n");
      else if (url === "/readyz") {
        const why = !startup.done
          ? `starting: ${startup.phase}`
          : draining
            ? "draining"
            : nc?.isClosed()
              ? "NATS connection closed"
              : natsOutage() > NATS_OUTAGE_NOT_READY_MS
                ? `NATS server lost ${Math.round(natsOutage() / 1000)} s ago, reconnecting`
                : null;
        res.writeHead(why ? 503 : 200).end(`${why ?? "ok"}\n`);
      } else if (url === "/metrics") {
        sync();
        res.writeHead(200, { "content-type": registry.contentType }).end(await registry.metrics());
      } else res.writeHead(404).end();
    });
    await listenOn(http, metricsPort, "0.0.0.0", "--metrics-port");
    const addr = http.address();
    const metricsAt = typeof addr === "object" && addr ? addr.port : "?";
    log(`starting; /healthz, /readyz and /metrics on :${metricsAt}`);

    const holds = new Map(plan.layers.map((l) => [l.layer, new Set(l.shardExperts[k])]));
    // The MTP layer's tensors too: a plan for MTP drafts places its experts (loaded only then).
    const ckpt = await Checkpoint.open(values.model!, {
      mtp: true,
      onFile: (d, n) => startup.opening(d, n),
    });
    checkPlanFitsModel(
      plan,
      modelArchitectureOf(ckpt.config),
      values.plan!,
      ckpt.config.numNextnPredictLayers,
    );
    // Gateways of these weights only reach this shard (ADR 0035).
    const served = { ...model, weights: await ckpt.weightsDigest() };
    startup.weights(served.weights);
    const mine = (layer: number, e: number) => holds.get(layer)?.has(e) ?? false;
    const load = expertLoad(ckpt, mine);
    const base = ckpt.bytesRead;
    startup.bytes(() => ckpt.bytesRead - base, load.bytes);
    startup.loading("experts", 0, load.experts);
    const progress = loadProgress({
      unit: "experts",
      total: load.experts,
      totalBytes: load.bytes,
      bytesRead: () => ckpt.bytesRead,
      human: (done, total) => {
        if (done === total || done % Math.max(1, Math.floor(total / 10)) === 0)
          log(`loading experts ${done}/${total}`);
      },
    });
    const experts = await loadExperts(
      ckpt,
      mine,
      (done, total) => {
        progress.update(done, total);
        startup.loading("experts", done, total);
      },
      { dtype },
    );
    progress.finish();
    log(
      `loaded ${[...experts.values()].reduce((n, m) => n + m.size, 0)} experts (${(ckpt.bytesRead / 2 ** 20).toFixed(1)} MiB read${dtype === "auto" ? "" : `, served in ${dtype}`}) for plan v${plan.version}`,
    );

    const backend = selected.backend;
    log(selected.summary);
    startup.step(`connecting to NATS at ${values.nats}`);
    nc = await connectNats({
      url: values.nats!,
      name: `expertmesh-shard-${k}-${id}`,
      auth: natsAuth,
      inboxPrefix: subjects.inboxPrefix(model),
      onPermissionDenied: (e) => {
        if (e.operation === "subscription")
          signals.fail(subscriptionRefused(e, subjects.all(model)));
      },
      waitMs: natsWaitMs,
      log,
    });
    natsOutage = outageClock(nc);
    // The native engine's scratch caches, given back after a quiet time.
    const trimmer = scratchTrimmerFor(backend, log);
    const shard = new ShardServer({
      nc,
      model: served,
      shard: k,
      id,
      plan,
      backend,
      experts,
      log,
      loadExperts: (wanted) => loadExperts(ckpt, wanted, undefined, { dtype }),
      ...(trimmer ? { onBatch: () => trimmer.touch() } : {}),
      previousWeights: process.env[PREVIOUS_WEIGHTS_ENV] === "1",
    });
    shard.start();
    if (backend.scratchBytes) registerScratchGauge(registry, () => backend.scratchBytes!());

    sync = shardMetrics(registry, k, shard);
    startup.finish();
    log(
      `serving ${model.namespace}/${model.model} shard ${k} on ${values.nats}; metrics on :${metricsAt}; ` +
        `weights ${served.weights} (started in ${startup.elapsedSeconds.toFixed(1)} s)`,
    );

    const stop = async (sig: string) => {
      if (draining) return;
      draining = true;
      log(`${sig}: draining (finishing accepted work, then unsubscribing)`);
      try {
        await shard.drain();
        await nc?.drain();
        log("drained");
      } catch (e) {
        // NATS went away first (stopped with us): no reply could be delivered any more.
        log(`NATS connection lost while draining (${formatError(e)}): stopped`);
      }
      http.close();
      process.exit(); // 0, or 1 after signals.fail
    };
    signals.serving((why) => void stop(why));
    await new Promise(() => {});
    return 0;
  },
};

/**
 * A shard's own series on its /metrics (the chart's Grafana dashboard reads them): its queue
 * depth, and what it answered. Returns the function that brings the counters up to the
 * shard's totals (called before each scrape).
 */
export function shardMetrics(
  registry: Registry,
  k: number,
  shard: {
    readonly pendingFrames: number;
    readonly totals: { frames: number; tokens: number; errors: number };
  },
): () => void {
  const labels = { shard: String(k) };
  new Gauge({
    name: "expertmesh_shard_pending_frames",
    help: "Dispatch frames waiting or being computed (queue depth).",
    registers: [registry],
    labelNames: ["shard"],
    collect() {
      this.set(labels, shard.pendingFrames);
    },
  });
  const frames = new Counter({
    name: "expertmesh_shard_frames_total",
    help: "Dispatch frames answered.",
    registers: [registry],
    labelNames: ["shard"],
  });
  const tokens = new Counter({
    name: "expertmesh_shard_tokens_total",
    help: "Tokens computed.",
    registers: [registry],
    labelNames: ["shard"],
  });
  const errors = new Counter({
    name: "expertmesh_shard_errors_total",
    help: "Frames answered with an error.",
    registers: [registry],
    labelNames: ["shard"],
  });
  let seen = { frames: 0, tokens: 0, errors: 0 };
  return () => {
    const t = shard.totals;
    frames.inc(labels, t.frames - seen.frames);
    tokens.inc(labels, t.tokens - seen.tokens);
    errors.inc(labels, t.errors - seen.errors);
    seen = { frames: t.frames, tokens: t.tokens, errors: t.errors };
  };
}
