// `expertmesh up -f MANIFEST`: runs a DeepSeekModel manifest on this machine as child
// processes — a nats-server, the expert shards (replicas.min of each) and the gateways (behind
// a front of its own when there are several: src/local/front.ts) — once prepareRun has
// decided and written everything they need (checkpoint, plan, run folder) —
// shows a progress bar per process while the weights load (src/local/progress-board.ts),
// prints the endpoints, and stops everything on Ctrl-C. A child that exits while serving is
// started again, with a back-off (Restarts). With --single-process, one gateway runs the
// routed experts itself (gateway --local): no nats-server, no shards. With autoscaling or
// rebalancing on, the operator's autoscaler runs here (src/local/autoscale.ts). Under
// `up --watch` (src/local/watch.ts), an edit the running processes can take arrives on
// standard input (applyEdit: the gateways roll onto it, replicas start or stop; ADR 0041).
// The Secrets and ConfigMaps the manifest names come from the -f files (ADR 0042); an edit of
// them arrives the same way, and new API keys or certificates reach the gateways (ADR 0043).
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  chatTemplateArgs,
  type GatewayRole,
  gatewayArgs,
  modelArgs,
  parseManifest,
  prefixCacheDiskArgs,
  servedModelName,
} from "../../api/manifest.ts";
import { everyShardExpertBytes, gatewayWeightBytes } from "../../api/memory.ts";
import type { DeepSeekModel } from "../../api/schema.ts";
import { loadAddon } from "../../engine/native.ts";
import { parseApiKeys } from "../../gateway/api-keys.ts";
import {
  LocalAutoscaler,
  localGateways,
  localPrefills,
  localScaling,
} from "../../local/autoscale.ts";
import { localDevices, parseDeviceFlag } from "../../local/devices.ts";
import { GatewayFront } from "../../local/front.ts";
import {
  envFromObjects,
  type GatewaySecrets,
  gatewaySecrets,
  gatewaySecretsNotes,
  type SecretsRead,
  secretsEdit,
  writeGatewaySecretFiles,
} from "../../local/gateway-secrets.ts";
import { hubSnapshot } from "../../local/hf-hub.ts";
import { manifestChange } from "../../local/manifest-change.ts";
import { findNatsServer } from "../../local/nats-binary.ts";
import { holdsModel, objectsOf } from "../../local/objects.ts";
import {
  NATS_UNDER_WATCH,
  onParentLines,
  STOP_ON_STDIN_EOF_ENV,
  stopWhenParentGone,
  UP_WATCHED_ENV,
} from "../../local/parent-watch.ts";
import { formatBytes, PROGRESS_ENV, parseProgressLine } from "../../local/progress.ts";
import { ProgressBoard } from "../../local/progress-board.ts";
import { watchAndRun } from "../../local/watch.ts";
import { modelArchitectureOf, readModelConfig } from "../../model/config.ts";
import { tinyModelCurrent, writeTinyModel } from "../../model/tiny.ts";
import { type PlacementPlan, planPlacement } from "../../moe/placement.ts";
import { serializePlan } from "../../moe/plan-json.ts";
import { cacheDir } from "../../util/cache-dir.ts";
import { ExpertMeshError, formatError } from "../../util/errors.ts";
import { portFlag } from "../options.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh up -f MANIFEST.yaml [-f SECRETS.yaml ...] [options]
  -f FILE            the DeepSeekModel's manifest; more -f files (and other documents of the
                     manifest's) may hold the Secrets and ConfigMaps it names, read as the pods
                     would read them: spec.env's valueFrom, spec.gateway.apiKeySecret and
                     .tls (the gateways then serve https), and
                     spec.model.source.huggingFace.tokenSecret (what no file holds: this
                     shell's $NAME, $EM_API_KEYS, $HF_TOKEN stand in; no TLS)
  --model DIR        checkpoint folder (default: <models-dir>/<spec.model.source.pvc.path>; a
                     spec.model.source.huggingFace repository is fetched into <models-dir>/hf,
                     from $HF_ENDPOINT or the Hub, with $HF_TOKEN, and fetched once per commit)
  --models-dir DIR   where local mode finds PVC paths (default ~/.cache/expertmesh/models)
  --http-port PORT   the gateway's OpenAI API (default: spec.gateway.ports.http, 8000; 0 picks one)
  --grpc-port PORT   the gateway's gRPC API: KServe v2 and expertmesh.v1.Generation
                     (default: spec.gateway.ports.grpc, 8001; 0 picks one)
  --host ADDR        listen address (default 127.0.0.1)
  --micro-batches N  the gateway's micro-batches in flight per step, 1 or 2 (gateway --micro-batches)
  --single-process   one gateway process that runs the routed experts itself (gateway --local):
                     no nats-server and no shards. The fastest way on one machine (the shards'
                     processes add a NATS round trip per layer and share its cores), but
                     spec.experts (shards, replicas) is not exercised
  --device D         auto (default): the roles the manifest gives GPUs (spec.gateway.gpus,
                     spec.experts.gpusPerShard) run on this machine's CUDA devices (shard k on
                     cuda:k mod count, the gateway on cuda:0) when it has any, else on the CPU;
                     cuda: the same, and no CUDA device is an error; cpu: everything on the CPU
A process that dies while serving is started again (after 1, 2, 4, 8, 16 s; the 6th exit of one
process within 10 minutes stops everything), the gateway on the same ports.
With more than one gateway (spec.gateway.replicas, or autoscaling), or under --watch, up listens
on the ports and hands each connection to a serving gateway, as a Service. With spec.autoscaling.enabled (mode
operator), the operator's autoscaler scales the gateways and each shard by queue depth:
processes are started, or stopped after they finish their work. With
spec.experts.rebalance.enabled, a skewed expert load is re-planned and rolled out live
(docs/autoscaling.md).
  --watch            apply each edit of MANIFEST as kubectl apply would make the operator
                     roll it: an edit of the gateways' flags alone (spec.gateway's sampling,
                     limits, KV cache, parsers; spec.servedModelName) rolls the gateways, one
                     new gateway serving before an old one stops (up holds the ports, even for
                     one gateway), nats-server and the shards running on; an edit of
                     spec.gateway.replicas or spec.experts.replicas (without autoscaling)
                     starts or stops processes; any
                     other edit stops everything as on Ctrl-C, then the new manifest starts;
                     one that does not validate is reported and the running one left alone;
                     an edit that says the same (a comment) restarts nothing. The other -f
                     files are watched too: new API keys or a new certificate in their
                     Secrets reach the running gateways without a restart (as a mounted
                     Secret's update reaches a pod); a new spec.env value is said, not applied
A tiny-v2/tiny-v3 preset whose folder does not exist yet is created (deterministic, seed 0).
While weights load, stderr shows a progress bar per process (plain lines when it is not a
terminal).`;

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a ? resolve(a.port) : reject(new Error("no port"))));
    });
  });
}

/** Calls `onLine` with each complete line of `stream` (a chunk may end mid-line). */
function eachLine(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  let rest = "";
  stream.on("data", (d: Buffer) => {
    const parts = (rest + d.toString()).split("\n");
    rest = parts.pop()!;
    for (const l of parts) onLine(l);
  });
  stream.on("end", () => {
    if (rest) onLine(rest);
    rest = "";
  });
}

/**
 * Spawns a child. Its progress lines (src/local/progress.ts) feed its bar on `board` when
 * `bar`; every other line is printed with the child's name in front. `ready` resolves with
 * the first line that matches `readyLine`, and rejects (failing the bar) when the child
 * exits first.
 */
function child(
  board: ProgressBoard,
  name: string,
  cmd: string,
  args: string[],
  readyLine: RegExp,
  bar: boolean,
): { proc: ChildProcess; ready: Promise<string> } {
  const proc = spawn(cmd, args, {
    // Standard input: a pipe `up` never writes to; it closes when `up` exits, however it
    // exits, and the child stops then (src/local/parent-watch.ts).
    stdio: ["pipe", "pipe", "pipe"],
    env: { ...process.env, [PROGRESS_ENV]: "1", [STOP_ON_STDIN_EOF_ENV]: "1" },
    // A process group of its own: Ctrl-C in a terminal signals the whole foreground group,
    // and nats-server would stop at once under the draining shards. `up` alone gets it and
    // stops the children in order (gateway, shards, then NATS).
    detached: true,
  });
  if (bar) board.add(name);
  let isReady = false;
  let resolveReady!: (line: string) => void;
  let rejectReady!: (e: Error) => void;
  const ready = new Promise<string>((res, rej) => {
    resolveReady = res;
    rejectReady = rej;
  });
  const onLine = (line: string) => {
    const progress = parseProgressLine(line);
    if (progress) {
      if (bar) board.update(name, progress);
      return;
    }
    if (!line.trim()) return;
    board.log(`[${name}] ${line.replace(/^\S+Z (shard \S+: |gateway \S+: |gateway: )?/, "")}`);
    if (!isReady && readyLine.test(line)) {
      isReady = true;
      resolveReady(line);
    }
  };
  eachLine(proc.stdout!, onLine);
  eachLine(proc.stderr!, onLine);
  proc.on("error", (e) =>
    rejectReady(
      new ExpertMeshError("EM_LOCAL_CHILD_EXITED", `${name} did not start: ${e.message}`),
    ),
  );
  proc.on("exit", (code, sig) => {
    board.fail(name, `exited (${sig ?? code})`);
    rejectReady(
      new ExpertMeshError(
        "EM_LOCAL_CHILD_EXITED",
        `${name} exited (${sig ?? code}) before it was ready`,
      ),
    );
  });
  return { proc, ready };
}

/** A child `up` starts (and starts again when it exits while serving). */
interface ChildSpec {
  name: string;
  cmd: string;
  args: string[];
  readyLine: RegExp;
  /** A progress bar while it first loads. */
  bar: boolean;
  /** Each time it serves (its ready line). */
  onReady?: (line: string) => void;
  /** Each time it exits, or is told to stop. */
  onStop?: () => void;
  /**
   * A gateway started in a roll (up --watch): one that exits before it first serves is not
   * started again; the roll stops there and the one it was to replace serves on.
   */
  rollout?: boolean;
}

interface Supervised {
  spec: ChildSpec;
  proc: ChildProcess;
  /** Its process printed its ready line (and has not exited since). */
  ready: boolean;
  /** Stopped on purpose (a replica the autoscaler scaled down): not started again. */
  retired: boolean;
  /** Why it was stopped, for the line that says it stopped (default: scaled down). */
  retiredAs?: string;
  /** It has served at least once. */
  served: boolean;
}

/**
 * up's -f files: their texts, and which one holds the DeepSeekModel (the only one, or the one
 * of several with a DeepSeekModel document; the others hold Secrets and ConfigMaps).
 */
export function localFiles(paths: string[]): { model: string; texts: [string, string][] } {
  if (paths.length === 0) throw new ExpertMeshError("EM_CLI_USAGE", "-f MANIFEST.yaml is required");
  const texts = paths.map((p): [string, string] => {
    try {
      return [p, readFileSync(p, "utf8")];
    } catch (err) {
      throw new ExpertMeshError("EM_MANIFEST_READ", `cannot read ${p}: ${String(err)}`, {
        cause: err,
      });
    }
  });
  if (paths.length === 1) return { model: paths[0]!, texts }; // (its errors: parseManifest's)
  const models = texts.filter(([, t]) => holdsModel(t)).map(([p]) => p);
  if (models.length !== 1)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `of the -f files, one must hold the DeepSeekModel (the others its Secrets and ConfigMaps): ${models.length === 0 ? "none does" : `${models.join(" and ")} do`}`,
    );
  return { model: models[0]!, texts };
}

/**
 * Stops a child as Ctrl-C would (SIGTERM; SIGKILL after 60 s); resolves once it has exited.
 * `skipDelay`: SIGINT too, a second signal (not merged with the first, as a second SIGTERM
 * might be), which ends a gateway's --shutdown-delay at once: for gateways that no front
 * sends anything to any more.
 */
function stopChild(c: ChildProcess, skipDelay = false): Promise<void> {
  return new Promise<void>((r) => {
    if (c.exitCode !== null || c.signalCode !== null) return r();
    const t = setTimeout(() => {
      c.kill("SIGKILL");
      r();
    }, 60_000);
    c.once("exit", () => {
      clearTimeout(t);
      r();
    });
    c.kill("SIGTERM");
    if (skipDelay) c.kill("SIGINT");
  });
}

/**
 * When a child that exited while serving starts again: after 1 s, then twice as long for each
 * restart of the same child in the last 10 minutes (1, 2, 4, 8, 16 s; a Deployment's pods
 * back off the same way); the 6th exit within 10 minutes stops `up` instead, an error that
 * comes back each time being no use restarting.
 */
export class Restarts {
  static readonly WINDOW_MS = 10 * 60_000;
  static readonly MAX = 5;
  readonly #at = new Map<string, number[]>();
  readonly #now: () => number;

  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  next(name: string): { count: number; delayS: number; giveUp?: string } {
    const t = this.#now();
    const recent = (this.#at.get(name) ?? []).filter((x) => t - x < Restarts.WINDOW_MS);
    if (recent.length >= Restarts.MAX)
      return {
        count: recent.length,
        delayS: 0,
        giveUp: `for the ${recent.length + 1}th time in ${Restarts.WINDOW_MS / 60_000} minutes`,
      };
    recent.push(t);
    this.#at.set(name, recent);
    return { count: recent.length, delayS: 2 ** (recent.length - 1) };
  }
}

/**
 * The flags of the nats-server `up` starts on loopback `port`: with JetStream, stored in
 * `storeDir` (a folder that outlives up's runs, as the disk tier's), when the manifest keeps
 * the prefix cache's blocks on it (spec.gateway.kvCache.remoteBytes).
 */
export function localNatsArgs(m: DeepSeekModel, port: number, storeDir: string): string[] {
  return [
    "-a",
    "127.0.0.1",
    "-p",
    String(port),
    ...(m.spec.gateway.kvCache.remoteBytes > 0 ? ["-js", "-sd", storeDir] : []),
  ];
}

/**
 * What `up` says of its own nats-server at `url`: it stands in for spec.nats, whose URL names
 * the cluster's server and whose Secrets (an identity, TLS) are the cluster's too.
 */
export function localNatsNote(m: DeepSeekModel, url: string): string {
  const n = m.spec.nats;
  const secrets = [
    n.credentialsSecret && "credentialsSecret",
    n.userSecret && "userSecret",
    n.tokenSecret && "tokenSecret",
    n.nkeySecret && "nkeySecret",
    n.tls && "tls",
  ].filter((s): s is string => typeof s === "string");
  const why =
    secrets.length === 0
      ? ""
      : `; spec.nats.${secrets.join(", ")} (Kubernetes Secrets) unused: it takes no credentials and speaks plain text on loopback`;
  const copies = m.spec.gateway.kvCache.remoteReplicas ?? 1;
  const one =
    copies > 1 && m.spec.gateway.kvCache.remoteBytes > 0
      ? `; one server: the prefix cache's bucket in one copy, not spec.gateway.kvCache.remoteReplicas's ${copies}`
      : "";
  return `nats-server on ${url} (in place of spec.nats.url, ${n.url}${why}${one})`;
}

/**
 * A gateway's flags from the manifest, for `up`'s one nats-server: the NATS tier's bucket in
 * one copy whatever kvCache.remoteReplicas says (a server holds no second copy).
 */
export function localGatewayArgs(m: DeepSeekModel, role: GatewayRole): string[] {
  return gatewayArgs(m, role).filter((a) => !a.startsWith("--prefix-cache-remote-replicas="));
}

/**
 * The disk tier's flags of `up`'s gateway replica `r` (none without kvCache.diskBytes), in
 * `dir`, a folder that outlives up's runs: `several` gateways share it, as on a ReadWriteMany
 * volume, unless they share a NATS tier (kvCache.remoteBytes): then each has a folder of its
 * own under it (as does each gateway and prefill gateway with spec.gateway.disaggregation).
 */
export function localDiskArgs(
  m: DeepSeekModel,
  dir: string,
  r: number,
  several: boolean,
  role: GatewayRole = "gateway",
): string[] {
  // Prefill gateways (spec.gateway.disaggregation) are more gateways over the NATS tier.
  const own =
    (several || m.spec.gateway.disaggregation !== undefined) &&
    m.spec.gateway.kvCache.remoteBytes > 0;
  const disk = prefixCacheDiskArgs(m, own ? join(dir, `${role}-${r}`) : dir);
  if (several && !own && disk.length > 0 && !disk.includes("--prefix-cache-disk-shared"))
    disk.push("--prefix-cache-disk-shared");
  return disk;
}

const UP_OPTIONS = {
  file: { type: "string", short: "f", multiple: true },
  model: { type: "string" },
  "models-dir": { type: "string" },
  "http-port": { type: "string" },
  "grpc-port": { type: "string" },
  host: { type: "string" },
  "micro-batches": { type: "string" },
  device: { type: "string" },
  "single-process": { type: "boolean" },
  watch: { type: "boolean" },
} as const;

/** up's flags, as parseArgs gives them. */
type UpValues = ReturnType<typeof parseArgs<{ options: typeof UP_OPTIONS }>>["values"];

/**
 * Everything `up` decides and writes before it starts a process: the manifest (and the
 * Secrets of the -f files), where each role runs, the model's checkpoint (fetched from the
 * Hub or created when it is a tiny preset), the placement plan, and the run folder with the
 * plan, the chat template and the gateways' Secrets files; said on `board` as it goes.
 */
async function prepareRun(values: UpValues, files: ReturnType<typeof localFiles>) {
  const single = values["single-process"] === true;
  if (single && values["micro-batches"] !== undefined && values["micro-batches"] !== "1")
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      "--micro-batches overlaps one half's expert round trip over NATS with the other's attention; with --single-process there is none",
    );
  const deviceFlag = parseDeviceFlag(values.device);
  // (the text localFiles read; parsed as readManifest would)
  const m = parseManifest(files.texts.find(([p]) => p === files.model)![1], files.model);
  const name = m.metadata.name;
  const ns = m.metadata.namespace ?? "default";
  // The Secrets and ConfigMaps of the files (ADR 0042), as kubectl apply -f would create them.
  const objects = objectsOf(files.texts, ns);
  if (single && m.spec.gateway.kvCache.remoteBytes > 0)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      "--single-process starts no nats-server, and spec.gateway.kvCache.remoteBytes keeps the prefix cache's blocks on one: drop --single-process, or set remoteBytes to 0",
    );
  const ports = m.spec.gateway.ports;
  const httpPort = portFlag(values["http-port"], "--http-port", ports.http);
  const grpcPort = portFlag(values["grpc-port"], "--grpc-port", ports.grpc);
  if (httpPort !== 0 && httpPort === grpcPort) {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `the HTTP and gRPC ports are both ${httpPort}: pass another --http-port or --grpc-port`,
    );
  }
  const cache = cacheDir();
  const pvcPath = m.spec.model.source.pvc?.path;
  const modelsDir = values["models-dir"] ?? join(cache, "models");
  // From the Hub (spec.model.source.huggingFace): fetched below, once the board shows it.
  const hub = values.model ? undefined : m.spec.model.source.huggingFace;
  let modelDir = values.model ?? join(modelsDir, pvcPath || name);
  // Where each role runs, decided before anything starts (--device cuda without a device
  // fails here).
  const cuda = (() => {
    if (deviceFlag === "cpu") return { devices: 0, status: "" };
    try {
      const s = loadAddon().cudaStatus();
      return { devices: s.devices, status: s.status };
    } catch (e) {
      return { devices: 0, status: (e as Error).message };
    }
  })();
  const devices = localDevices(
    deviceFlag,
    { gateway: m.spec.gateway.gpus, perShard: m.spec.experts.gpusPerShard },
    cuda,
  );
  const board = new ProgressBoard(process.stderr);
  const say = (msg: string) => board.log(`[up] ${msg}`);
  say(devices.note);
  // spec.env, as the pods get it: in every process `up` starts, and for the Hub download
  // (HF_ENDPOINT, a proxy); the manifest's value wins over this shell's, as in a pod.
  // A valueFrom one names a Secret or ConfigMap: read from the -f files when one holds it,
  // else the shell's variable of that name stands in for it.
  const env = m.spec.env ?? [];
  for (const { name: key, value } of env) if (value !== undefined) process.env[key] = value;
  const literal = env.filter((e) => e.value !== undefined).map((e) => e.name);
  if (literal.length > 0) say(`spec.env: ${literal.join(", ")} set for every process`);
  const envRead = envFromObjects(m, objects);
  for (const { name: key, valueFrom } of env) {
    const ref = valueFrom?.secretKeyRef ?? valueFrom?.configMapKeyRef;
    if (!ref) continue;
    const kind = valueFrom?.secretKeyRef ? "Secret" : "ConfigMap";
    const what = `${kind} ${ref.name} (key ${ref.key})`;
    const held = envRead.get(key);
    if (held) {
      process.env[key] = held.value;
      say(`spec.env's ${key}: from the ${what} in ${held.source}`);
      continue;
    }
    const missing = objects.has(kind, ref.name)
      ? `the ${kind} ${ref.name} in the -f files has no key ${ref.key}`
      : `no -f file holds the ${what}`;
    say(
      process.env[key] !== undefined
        ? `spec.env's ${key}: ${missing}; from this shell's $${key}`
        : `spec.env's ${key}: ${missing}; unset here (give the ${kind} with another -f, or set $${key} in this shell)`,
    );
  }
  // The Hub token (huggingFace.tokenSecret) from a -f file's Secret, as the pods' download.
  const tokenRef = hub?.tokenSecret;
  const token = tokenRef && objects.get("Secret", tokenRef.name, tokenRef.key);
  if (token) {
    process.env["HF_TOKEN"] = token.value;
    say(`spec.model.source.huggingFace.tokenSecret: the token from ${token.source}`);
  }
  if (hub) modelDir = await fetchFromHub(hub, join(modelsDir, "hf"), board, say);
  // The API keys and serving certificate from the -f files' Secrets (written in the run
  // folder below, as the pods mount them); else $EM_API_KEYS stands in, and no TLS.
  const secretsRead: SecretsRead = {
    gateway: gatewaySecrets(m, objects),
    env: envRead,
  };
  // (keys from a Secret replace the shell's: $EM_API_KEYS goes to no gateway then)
  if (secretsRead.gateway.apiKeys) delete process.env["EM_API_KEYS"];
  const shellKeys = parseApiKeys(process.env["EM_API_KEYS"] ?? "").length > 0;
  for (const note of gatewaySecretsNotes(m, secretsRead.gateway, shellKeys)) say(note);
  const preset = m.spec.model.preset;
  const tiny =
    preset === "tiny-v2" || preset === "tiny-v3"
      ? {
          arch: preset === "tiny-v2" ? ("v2" as const) : ("v3" as const),
          preset: "tiny" as const,
          // MTP drafts need the layer: the tiny V3 model then gets one (random, like the rest).
          mtp: preset === "tiny-v3" && m.spec.gateway.speculative?.method === "mtp",
        }
      : null;
  const missing = !existsSync(join(modelDir, "config.json"));
  // A tiny model in the cache that an older expertmesh wrote (its tokenizer, say) is
  // written again; a folder given with --model is never touched.
  const stale = !missing && tiny && !values.model && !hub && !tinyModelCurrent(modelDir, tiny);
  if (missing || stale) {
    if (!tiny) {
      throw new ExpertMeshError(
        "EM_CKPT_READ",
        `no checkpoint at ${modelDir} (config.json missing): copy the model there or pass --model DIR`,
      );
    }
    say(
      stale
        ? `writing the ${preset} model in ${modelDir} again (an older expertmesh wrote it)`
        : `creating the ${preset} model in ${modelDir}`,
    );
    const bar = bytesBar(board, `${preset} model`);
    await bar.around(
      writeTinyModel(modelDir, {
        ...tiny,
        seed: 0,
        onProgress: (p) => bar.update(p.bytesWritten, p.totalBytes),
      }),
      (summary) => summary.tensorBytes,
    );
  }

  const config = readModelConfig(modelDir);
  // (single process: one "shard", the gateway, holds every expert once)
  const plan = planPlacement({
    architecture: modelArchitectureOf(config),
    numShards: single ? 1 : m.spec.experts.shards,
    redundantExperts: single ? 0 : m.spec.experts.redundantExperts,
    mtpLayers: m.spec.gateway.speculative?.method === "mtp" ? 1 : 0,
  });
  const runDir = mkdtempSync(join(tmpdir(), `expertmesh-up-${name}-`));
  const planPath = join(runDir, "plan.json");
  writeFileSync(planPath, serializePlan(plan));
  const chatTemplatePath = join(runDir, "chat_template.jinja");
  if (m.spec.gateway.chatTemplate !== undefined)
    writeFileSync(chatTemplatePath, m.spec.gateway.chatTemplate);
  const secretArgs = writeGatewaySecretFiles(runDir, secretsRead.gateway);
  // The gateways look at those files every second: an edit under --watch reaches them soon.
  if (secretArgs.length > 0) process.env["EM_FILE_RELOAD_INTERVAL_MS"] ??= "1000";
  const tls = secretsRead.gateway.tls;
  say(
    single
      ? `${ns}/${name}: one process, the gateway running every expert (--single-process: spec.experts' ${m.spec.experts.shards} shard(s) are not started), run folder ${runDir}`
      : `${ns}/${name}: ${plan.numShards} shard(s) x ${m.spec.experts.replicas.min} replica(s), plan v${plan.version}, run folder ${runDir}`,
  );
  const memory = upMemory(m, plan, totalmem(), single);
  if (memory) say(memory);
  const scaling = localScaling(m, single);
  // Under --watch, up's front holds the ports even for one gateway: a roll starts the new
  // gateway before the old one stops, and no request finds the ports closed.
  const gateways = localGateways(m, single, process.env[UP_WATCHED_ENV] === "1");
  if (gateways.note) say(gateways.note);
  return {
    single,
    m,
    name,
    ns,
    httpPort,
    grpcPort,
    modelDir,
    devices,
    board,
    say,
    secretsRead,
    shellKeys,
    plan,
    runDir,
    planPath,
    chatTemplatePath,
    secretArgs,
    tls,
    scaling,
    gateways,
  };
}

export const upCommand: Command = {
  name: "up",
  summary:
    "run a DeepSeekModel manifest on this machine: nats-server, shards and a gateway as local processes",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: UP_OPTIONS,
    });
    const files = localFiles(values.file ?? []);
    if (values.watch) {
      return await watchAndRun({
        file: files.model,
        others: files.texts.map(([p]) => p).filter((p) => p !== files.model),
        upArgs: argv.filter((a) => a !== "--watch"),
        say: (line) => process.stderr.write(`[up] ${line}\n`),
      });
    }
    const prepared = await prepareRun(values, files);
    const { single, m, name, ns, httpPort, grpcPort, modelDir, devices, board, say } = prepared;
    const { shellKeys, plan, runDir, planPath, tls, scaling, gateways } = prepared;
    // The manifest the gateways start from: `m`, until up --watch rolls them onto an edit
    // that reaches them alone (src/local/manifest-change.ts); each edit's chat template is a
    // file of its own (a gateway of the previous one may start again while the roll runs),
    // and an edit that names other Secrets writes their files as a new version (the gateways
    // still running on the previous ones keep theirs).
    let gm = m;
    let { secretsRead, secretArgs, chatTemplatePath } = prepared;
    let secretsVersion = 0;

    // The children in start order (nats-server, shards, gateway), each with its process now:
    // one that exits after everything is serving is started again, as a Deployment's pod
    // would be (see Restarts).
    const children: Supervised[] = [];
    const restarts = new Restarts();
    let scaler: LocalAutoscaler | undefined;
    let front: GatewayFront | undefined;
    let serving = false;
    let stopping = false;
    const start = (spec: ChildSpec, afterStart: boolean): Promise<string> => {
      // (no progress bar the second time: the board is closed once everything serves)
      const c = child(
        board,
        spec.name,
        spec.cmd,
        spec.args,
        spec.readyLine,
        spec.bar && !afterStart,
      );
      let entry = children.find((e) => e.spec === spec);
      if (!entry) {
        entry = { spec, proc: c.proc, ready: false, retired: false, served: false };
        children.push(entry);
      }
      const self = entry;
      self.proc = c.proc;
      self.ready = false;
      c.ready.then(
        (line) => {
          if (self.proc !== c.proc || c.proc.exitCode !== null) return;
          self.ready = true;
          self.served = true;
          spec.onReady?.(line);
        },
        () => {},
      );
      c.proc.on("exit", (code, sig) => {
        self.ready = false;
        spec.onStop?.();
        if (!serving || stopping) return; // while starting, `ready` fails up as a whole
        if (self.retired) {
          say(`${spec.name} stopped (${self.retiredAs ?? "scaled down"}; exit ${sig ?? code})`);
          return;
        }
        if (spec.rollout && !self.served) {
          self.retired = true; // the roll says why (its ready promise failed)
          return;
        }
        const verdict = restarts.next(spec.name);
        if (verdict.giveUp) {
          say(`${spec.name} exited (${sig ?? code}) ${verdict.giveUp}; stopping`);
          void stopAll(1);
          return;
        }
        say(
          `${spec.name} exited (${sig ?? code}); starting it again in ${verdict.delayS} s (restart ${verdict.count})`,
        );
        setTimeout(() => {
          if (stopping || self.retired) return;
          start(spec, true).then(
            () => say(`${spec.name} is serving again`),
            () => {}, // its exit handler (above) decides what comes next
          );
        }, verdict.delayS * 1000);
      });
      return c.ready;
    };
    const stopAll = async (code: number) => {
      if (stopping) {
        // A second Ctrl-C: no more waiting.
        say("stopping now");
        process.exit(code);
      }
      stopping = true;
      void scaler?.stop();
      front?.close();
      board.close("stopped");
      say("stopping (Ctrl-C again to stop at once)");
      // Gateways first (each finishes its requests in flight, up to its --shutdown-timeout of
      // 45 s, and writes its prefix cache's disk tier), then shards (drain), then NATS; the
      // replicas of a role together, whatever order they started in.
      const rank = (n: string) =>
        n.startsWith("gateway") || n.startsWith("prefill.") ? 0 : n.startsWith("shard-") ? 1 : 2;
      for (const group of [0, 1, 2])
        await Promise.all(
          children
            .filter((e) => rank(e.spec.name) === group)
            // (the front is closed: the gateways' second of draining would serve no one)
            .map((e) => stopChild(e.proc, group === 0)),
        );
      process.exit(code);
    };
    process.on("SIGINT", () => void stopAll(0));
    process.on("SIGTERM", () => void stopAll(0));
    // The terminal closed: the children, in groups of their own, would not hear of it.
    process.on("SIGHUP", () => void stopAll(0));
    // Under `up --watch`: stop when it is gone, however it went (src/local/watch.ts).
    stopWhenParentGone(() => void stopAll(0));
    // Under `up --watch`: an edit the running processes take (a roll of the gateways, replica
    // counts; src/local/manifest-change.ts), as a line on standard input (src/local/watch.ts):
    // applied once everything serves, one at a time, each against the one before.
    let applyEdit: ((next: DeepSeekModel) => Promise<void>) | undefined;
    const earlyEdits: DeepSeekModel[] = [];
    let editing = Promise.resolve();
    const queueEdit = (next: DeepSeekModel) => {
      const apply = applyEdit;
      if (!apply) {
        earlyEdits.push(next);
        return;
      }
      editing = editing.then(
        () => apply(next),
        () => {},
      );
    };
    // Under `up --watch`: the -f files changed ({"files": true}); their Secrets' new content
    // reaches the gateways' files, which they read again (src/local/gateway-secrets.ts).
    /** The Secrets and ConfigMaps of the -f files as they are now. */
    const objectsNow = () => objectsOf(localFiles(values.file ?? []).texts, ns);
    const reloadFiles = (quiet: boolean) => {
      let read: SecretsRead;
      try {
        const objs = objectsNow();
        read = { gateway: gatewaySecrets(gm, objs), env: envFromObjects(m, objs) };
      } catch (err) {
        say(`the -f files changed, but ${formatError(err)}: the gateways keep what they have`);
        return;
      }
      const edit = secretsEdit(gm, secretsRead, read);
      secretsRead = edit.running;
      if (edit.write) writeGatewaySecretFiles(runDir, secretsRead.gateway, secretsVersion);
      for (const note of edit.notes) say(note);
      if (edit.notes.length === 0 && !quiet)
        say("the -f files changed, but not what the processes read of them");
    };
    onParentLines((line) => {
      let next: DeepSeekModel;
      try {
        const message = JSON.parse(line) as {
          manifest?: DeepSeekModel;
          files?: boolean;
          quiet?: boolean;
        };
        if (message.files === true) return reloadFiles(message.quiet === true);
        next = message.manifest!;
        if (typeof next?.spec?.gateway !== "object") throw new Error("it has no spec.gateway");
      } catch (err) {
        say(`a line from up --watch that is no manifest (${formatError(err)}): nothing changes`);
        return;
      }
      queueEdit(next);
    });
    process.on("exit", () => {
      for (const { proc: c } of children) if (c.exitCode === null) c.kill("SIGKILL");
    });

    try {
      const cli = [process.argv[1]!];
      const named = [
        `--model=${modelDir}`,
        `--namespace=${ns}`,
        `--model-name=${name}`,
        // Text lines on up's terminal (it reads its children's lines): spec.logFormat is the pods'.
        ...modelArgs(m).filter((a) => !a.startsWith("--log-format")),
      ];
      // nats-server and the shards; resolves with the gateway's flags to reach them.
      async function startShards(): Promise<string[]> {
        const natsPort = await freePort();
        await start(
          {
            name: "nats",
            cmd: "sh",
            args: [
              "-c",
              NATS_UNDER_WATCH,
              "nats-server",
              findNatsServer(),
              ...localNatsArgs(m, natsPort, join(cacheDir(), "jetstream", `${ns}-${name}`)),
            ],
            readyLine: /Server is ready/,
            bar: false,
          },
          false,
        );
        natsUrl = `nats://127.0.0.1:${natsPort}`;
        say(localNatsNote(m, natsUrl));
        const shards = [];
        for (let k = 0; k < plan.numShards; k++)
          for (let r = 0; r < m.spec.experts.replicas.min; r++)
            shards.push(start(shardSpec(k, natsUrl), false));
        await Promise.all(shards);
        return [`--plan=${planPath}`, `--nats=${natsUrl}`];
      }
      // Replica r of shard k (r counts up per shard: a replica started by the autoscaler
      // never takes the name, or the restart history, of one it stopped).
      const replicasStarted = new Map<number, number>();
      function shardSpec(k: number, nats: string): ChildSpec {
        const r = replicasStarted.get(k) ?? 0;
        replicasStarted.set(k, r + 1);
        return {
          name: `shard-${k}.${r}`,
          cmd: process.execPath,
          args: [
            ...cli,
            "shard",
            ...named,
            `--plan=${planPath}`,
            `--nats=${nats}`,
            `--shard=${k}`,
            `--id=r${r}`,
            "--metrics-port=0",
            `--device=${devices.shard(k)}`,
          ],
          readyLine: /serving /,
          bar: true,
        };
      }
      let natsUrl = "";
      // Where the gateway finds its experts: in process, or on the shards (started first).
      const experts = single ? ["--local"] : await startShards();
      const host = values.host ?? "127.0.0.1";
      // More than one gateway: `up` listens on the ports (the gateways' Service) and each
      // gateway on loopback ports of its own (src/local/front.ts).
      let ports: { http: string; grpc: string } | undefined;
      if (gateways.front) {
        front = new GatewayFront();
        const p = await front.listen(host, httpPort, grpcPort);
        ports = { http: String(p.http), grpc: String(p.grpc) };
      }
      const portsOf = (line: string) => ({
        http: /on https?:\/\/\S+?:(\d+)/.exec(line)?.[1],
        grpc: /gRPC \(KServe v2\) on :(\d+)/.exec(line)?.[1],
      });
      // Outlives the run folder: the next `up` of this model starts with the blocks.
      const diskDir = join(cacheDir(), "prefix-cache", `${ns}-${name}`);
      const diskOf = (r: number) => localDiskArgs(gm, diskDir, r, front !== undefined);
      /** A gateway process's flags: a serving gateway's or a prefill gateway's, replica r. */
      const gatewayFlags = (
        role: GatewayRole,
        r: number,
        listen: { http: number; grpc: number; host: string },
      ) => [
        ...cli,
        "gateway",
        ...named,
        ...experts,
        `--http-port=${listen.http}`,
        `--grpc-port=${listen.grpc}`,
        `--host=${listen.host}`,
        "--metrics-port=0",
        `--device=${devices.gateway}`,
        ...localGatewayArgs(gm, role),
        ...(role === "prefill" ? localDiskArgs(gm, diskDir, r, true, "prefill") : diskOf(r)),
        ...chatTemplateArgs(gm, chatTemplatePath),
        ...secretArgs,
        ...(values["micro-batches"] ? [`--micro-batches=${values["micro-batches"]}`] : []),
        // Behind the front: a stopping gateway (scaled down, rolled) answers for a second
        // more, each answer ending its connection, so keep-alive clients move to the others
        // before it closes the idle ones (a request sent as one closes would fail).
        ...(front && role === "gateway" ? ["--shutdown-delay=1"] : []),
      ];
      let gatewaysStarted = 0;
      const gatewaySpec = (): ChildSpec => {
        const r = gatewaysStarted++;
        const gwName = front ? `gateway.${r}` : "gateway";
        return {
          name: gwName,
          cmd: process.execPath,
          args: gatewayFlags(
            "gateway",
            r,
            front
              ? { http: 0, grpc: 0, host: "127.0.0.1" }
              : ports // (known once the first one serves: one started in a roll takes them)
                ? { http: +ports.http, grpc: +ports.grpc, host }
                : { http: httpPort, grpc: grpcPort, host },
          ),
          readyLine: /serving '/,
          bar: true,
          ...(front
            ? {
                onReady: (line: string) => {
                  const p = portsOf(line);
                  if (p.http && p.grpc) front!.add(gwName, { http: +p.http, grpc: +p.grpc });
                },
                onStop: () => front!.remove(gwName),
              }
            : {}),
        };
      };
      // Prefill gateways (spec.gateway.disaggregation, ADR 0029): on loopback, out of the
      // front's rotation; the gateways hand them long prompts over NATS. r counts up, as the
      // gateways' (a replica the autoscaler starts takes a new name).
      let prefillsStarted = 0;
      const prefillSpec = (r = prefillsStarted++): ChildSpec => ({
        name: `prefill.${r}`,
        cmd: process.execPath,
        args: gatewayFlags("prefill", r, { http: 0, grpc: 0, host: "127.0.0.1" }),
        readyLine: /serving '/,
        bar: true,
      });
      const prefills = Array.from({ length: localPrefills(m) }, () => start(prefillSpec(), false));
      const first = gatewaySpec();
      const servingLines = await Promise.all([
        start(first, false),
        ...Array.from({ length: gateways.initial - 1 }, () => start(gatewaySpec(), false)),
      ]);
      await Promise.all(prefills);
      board.close();
      if (!ports) {
        // The ports the gateway listens on (not the flags: those may be 0); a gateway started
        // again takes the same ones.
        const p = portsOf(servingLines[0]!);
        ports = { http: p.http ?? String(httpPort), grpc: p.grpc ?? String(grpcPort) };
        const { http, grpc } = ports;
        first.args = first.args.map((a) =>
          a.startsWith("--http-port=")
            ? `--http-port=${http}`
            : a.startsWith("--grpc-port=")
              ? `--grpc-port=${grpc}`
              : a,
        );
      } else {
        say(
          `${gateways.initial} gateway(s) behind ${host}:${ports.http} and :${ports.grpc}, each connection to the one with the fewest`,
        );
      }
      const { http, grpc } = ports;
      const at = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
      const model = servedModelName(m);
      const scheme = tls ? "https" : "http";
      // (with TLS, curl and bench trust the certificate's CA: --cacert; with API keys, they
      // send one, never printed here)
      const trust = tls ? " --cacert CA.crt" : "";
      const keyed = secretsRead.gateway.apiKeys !== undefined || shellKeys;
      process.stdout.write(
        `\nexpertmesh is serving '${model}' at ${scheme}://${at}:${http}/v1 (OpenAI-compatible)\n` +
          `  and over gRPC${tls ? " with TLS" : ""} at ${at}:${grpc} (KServe v2 inference.GRPCInferenceService, expertmesh.v1.Generation)\n` +
          (keyed
            ? `  API keys required (${secretsRead.gateway.apiKeys ? `spec.gateway.apiKeySecret's, from ${secretsRead.gateway.apiKeys.source}` : "$EM_API_KEYS"}): KEY below is one of them\n`
            : "") +
          `  curl${trust} ${scheme}://${at}:${http}/v1/chat/completions -H 'content-type: application/json' \\\n` +
          (keyed ? "    -H 'authorization: Bearer KEY' \\\n" : "") +
          `    -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'\n` +
          `  expertmesh bench --url ${scheme}://${at}:${http}${trust}${keyed ? " --api-key KEY" : ""} measures it under load\n` +
          "Ctrl-C stops everything.\n\n",
      );
      serving = true;
      // A role's processes: "gateway" (with the front), "prefill" and "shard-<k>".
      const replicasOf = (role: string) =>
        children.filter((e) => !e.retired && e.spec.name.startsWith(`${role}.`));
      const specFor = (role: string) =>
        role === "gateway"
          ? gatewaySpec()
          : role === "prefill"
            ? prefillSpec()
            : shardSpec(Number(role.slice("shard-".length)), natsUrl);
      /** Starts or stops processes of `role` until `n` run (the autoscaler's, an edit's). */
      const scaleRole = (role: string, n: number) => {
        if (stopping) return;
        const now = replicasOf(role);
        for (let i = now.length; i < n; i++) {
          const spec = specFor(role);
          say(`starting ${spec.name} (scaled up)`);
          start(spec, true).then(
            () => say(`${spec.name} is serving`),
            () => {}, // its exit handler decides what comes next
          );
        }
        // The newest first: out of the rotation, then each finishes what it has.
        for (const e of now.slice(n).reverse()) {
          e.retired = true;
          e.spec.onStop?.();
          say(`stopping ${e.spec.name} (scaled down)`);
          if (e.proc.exitCode === null && e.proc.signalCode === null) e.proc.kill("SIGTERM");
        }
      };
      // The manifest the running processes follow (up --watch's edits applied).
      let applied = m;
      let templatesWritten = 0;
      applyEdit = async (next: DeepSeekModel) => {
        const change = manifestChange(applied, next, single);
        if (change.kind === "all")
          say(`an edit from up --watch reaches more than it can apply (${change.why}): ignored`);
        if (change.kind !== "live") return;
        // Other Secrets for the API keys or the certificate (spec.gateway.apiKeySecret, .tls):
        // the new gateways read them from files of a version of their own.
        const secretsBefore = { read: secretsRead, args: secretArgs };
        const refs = (x: DeepSeekModel) =>
          JSON.stringify([x.spec.gateway.apiKeySecret, x.spec.gateway.tls]);
        if (change.roll && refs(next) !== refs(gm)) {
          let gateway: GatewaySecrets;
          try {
            gateway = gatewaySecrets(next, objectsNow());
          } catch (err) {
            say(`the edit names Secrets the gateways cannot use (${formatError(err)}): ignored`);
            return;
          }
          if (secretsRead.gateway.apiKeys && !next.spec.gateway.apiKeySecret && !shellKeys)
            say("spec.gateway.apiKeySecret is gone: the new gateways take requests without a key");
          if (secretsRead.gateway.tls && !next.spec.gateway.tls)
            say("spec.gateway.tls is gone: the new gateways serve plain HTTP and gRPC");
          secretsRead = { ...secretsRead, gateway };
          secretArgs = writeGatewaySecretFiles(runDir, gateway, ++secretsVersion);
          for (const note of gatewaySecretsNotes(next, gateway, shellKeys)) say(note);
        }
        const before = applied;
        applied = next;
        const olds = change.roll
          ? children.filter(
              (e) =>
                !e.retired &&
                (e.spec.name.startsWith("gateway") || e.spec.name.startsWith("prefill.")),
            )
          : [];
        const flagsBefore = gm;
        if (change.roll) {
          gm = next; // (gateways that scaling starts take the new flags too)
          if (next.spec.gateway.chatTemplate !== undefined) {
            chatTemplatePath = join(runDir, `chat_template.${++templatesWritten}.jinja`);
            writeFileSync(chatTemplatePath, next.spec.gateway.chatTemplate);
          }
        }
        if (change.gateways !== undefined) scaleRole("gateway", change.gateways);
        if (change.shardReplicas !== undefined)
          for (let k = 0; k < plan.numShards; k++) scaleRole(`shard-${k}`, change.shardReplicas);
        if (olds.length > 0) await rollGateways(olds, before, flagsBefore, secretsBefore);
      };
      /**
       * Replaces `olds` with gateways on `gm`'s flags, one at a time, each new one serving
       * before the one it replaces leaves the front's rotation (ADR 0041; under --watch the
       * front holds the ports however many gateways run, and prefill gateways have none).
       */
      const rollGateways = async (
        olds: Supervised[],
        before: DeepSeekModel,
        flagsBefore: DeepSeekModel,
        secretsBefore: { read: SecretsRead; args: string[] },
      ) => {
        olds = olds.filter((e) => !e.retired); // (an edit's scaling down stops the newest)
        say(
          `rolling ${olds.length} gateway process(es) onto the edited manifest, one at a time: each new one serves before the one it replaces stops (nats-server and the shards run on)`,
        );
        for (const old of olds) {
          if (stopping) return;
          const isPrefill = old.spec.name.startsWith("prefill.");
          // Out of the autoscaler's count while its replacement starts (it serves until then).
          old.retired = true;
          const spec = isPrefill ? prefillSpec() : gatewaySpec();
          spec.rollout = true;
          old.retiredAs =
            spec.name === old.spec.name
              ? "to start on the edited manifest"
              : `replaced by ${spec.name}`;
          try {
            await start(spec, true);
          } catch (err) {
            if (stopping) return;
            say(
              `${spec.name} did not start on the edited manifest (${formatError(err)}): the roll stops here; ${old.spec.name} serves on (fix the manifest to roll again)`,
            );
            old.retired = false;
            old.retiredAs = undefined;
            gm = flagsBefore;
            secretsRead = secretsBefore.read;
            secretArgs = secretsBefore.args;
            return;
          }
          // Out of the rotation, then it finishes what it has.
          old.spec.onStop?.();
          if (old.proc.exitCode === null && old.proc.signalCode === null) old.proc.kill("SIGTERM");
          say(`${spec.name} serves the edited manifest`);
        }
        const name = servedModelName(gm);
        say(
          name === servedModelName(before)
            ? "the gateways run the edited manifest"
            : `the gateways run the edited manifest, serving '${name}'`,
        );
      };
      for (const next of earlyEdits.splice(0)) queueEdit(next);
      for (const note of scaling.notes) say(note);
      if (scaling.run) {
        scaler = new LocalAutoscaler({
          model: m,
          plan,
          planPath,
          natsUrl,
          say,
          processes: {
            roles: [
              ...(front ? ["gateway"] : []),
              ...(m.spec.gateway.disaggregation ? ["prefill"] : []),
              ...Array.from({ length: plan.numShards }, (_, k) => `shard-${k}`),
            ],
            replicas: (role) => replicasOf(role).length,
            ready: (role) => replicasOf(role).filter((e) => e.ready).length,
            scale: scaleRole,
          },
        });
        scaler.start();
      }
    } catch (err) {
      // (Ctrl-C while starting makes children exit "before they were ready": not news.)
      if (!stopping) {
        board.close("stopped");
        say(formatError(err));
        await stopAll(1);
      }
    }
    await new Promise(() => {});
    return 0;
  },
};

/**
 * What the processes `up` starts will hold in memory (weights and the gateway's KV cache,
 * src/api/memory.ts), against this machine's: a warning before minutes of loading end in the
 * kernel killing one of them. Null when the preset's figures are not known.
 */
export function upMemory(
  m: DeepSeekModel,
  plan: PlacementPlan,
  machineBytes = totalmem(),
  singleProcess = false,
): string | null {
  const shards = everyShardExpertBytes(m, plan);
  const weights = gatewayWeightBytes(m);
  if (weights === null || shards === null) return null;
  const expertBytes =
    shards.reduce((a, b) => a + b, 0) * (singleProcess ? 1 : m.spec.experts.replicas.min);
  const gateway = weights + m.spec.gateway.kvCache.bytes;
  // Prefill gateways (spec.gateway.disaggregation) hold as much as a gateway each.
  const gateways = localGateways(m, singleProcess).initial + (singleProcess ? 0 : localPrefills(m));
  const total = expertBytes + gateways * gateway;
  const line = singleProcess
    ? `memory: the gateway will hold ~${formatBytes(total)} (experts ${formatBytes(expertBytes)}, ` +
      `the rest ${formatBytes(gateway)} with its KV cache); this machine has ${formatBytes(machineBytes)}`
    : `memory: the processes will hold ~${formatBytes(total)} (shards ${formatBytes(expertBytes)}, ` +
      (gateways > 1
        ? `${gateways} gateways ${formatBytes(gateway)} each with its KV cache`
        : `gateway ${formatBytes(gateway)} with its KV cache`) +
      `); this machine has ${formatBytes(machineBytes)}`;
  return total > 0.9 * machineBytes
    ? `${line}: too little, expect one to be killed while loading (a smaller spec.gateway.kvCache.bytes, or spec.model.dtype fp8, holds less)`
    : line;
}

/**
 * The checkpoint of spec.model.source.huggingFace, fetched into `root` with a progress bar
 * (src/local/hf-hub.ts): $HF_TOKEN stands for the manifest's tokenSecret, a Kubernetes Secret
 * this machine cannot read, and $HF_ENDPOINT for the Hub's address.
 */
async function fetchFromHub(
  source: { repo: string; revision: string; tokenSecret?: { name: string } },
  root: string,
  board: ProgressBoard,
  say: (msg: string) => void,
): Promise<string> {
  const token = process.env["HF_TOKEN"] || undefined;
  if (source.tokenSecret && !token)
    say(
      `spec.model.source.huggingFace.tokenSecret (${source.tokenSecret.name}) is in no -f file: give the Secret with another -f, or set HF_TOKEN, for a gated or private repository`,
    );
  const label = `${source.repo}@${source.revision}`;
  const bar = bytesBar(board, label);
  const got = await bar.around(
    hubSnapshot({
      repo: source.repo,
      revision: source.revision,
      root,
      ...(process.env["HF_ENDPOINT"] ? { endpoint: process.env["HF_ENDPOINT"] } : {}),
      ...(token ? { token } : {}),
      onProgress: (done, total) => bar.update(done, total),
      log: say,
    }),
  );
  say(
    got.fetched > 0
      ? `${label}: fetched ${formatBytes(got.fetched)} into ${got.dir}`
      : `${label}: commit ${got.commit.slice(0, 12)}, complete in ${got.dir}`,
  );
  return got.dir;
}

/**
 * A bar of bytes on `board` for work `up` does itself (writing the tiny model, fetching from
 * the Hub): `update` as bytes arrive; `around(work)` ends the bar when the work resolves (at
 * `size(result)` bytes if given, else at the last figures), or fails it with the error.
 */
function bytesBar(board: ProgressBoard, label: string) {
  let last = { done: 0, total: 0 };
  const show = (finished: boolean) =>
    board.update(label, {
      unit: "bytes",
      done: last.done,
      total: last.total,
      bytes: last.done,
      totalBytes: last.total,
      finished,
    });
  board.add(label, "bytes");
  return {
    update(done: number, total: number) {
      last = { done, total };
      show(false);
    },
    async around<T>(work: Promise<T>, size?: (result: T) => number): Promise<T> {
      try {
        const result = await work;
        if (size) last = { done: size(result), total: size(result) };
        show(true);
        return result;
      } catch (err) {
        board.fail(label, formatError(err));
        throw err;
      }
    },
  };
}
