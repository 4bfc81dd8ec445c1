// What `expertmesh up` decides and writes before it starts a process (prepareRun): the -f
// files' manifest and Secrets, where each role runs (CPU or a CUDA device), spec.env, the
// model's checkpoint (fetched from the Hub, or written when it is a tiny preset), the
// placement plan, and the run folder with the plan, the chat template and the gateways'
// Secrets files; said on a progress board as it goes. src/local/run.ts then runs it.
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import type { parseArgs } from "node:util";
import { parseManifest } from "../api/manifest.ts";
import { everyShardExpertBytes, gatewayWeightBytes } from "../api/memory.ts";
import type { DeepSeekModel } from "../api/schema.ts";
import { portFlag } from "../cli/options.ts";
import { loadAddon } from "../engine/native.ts";
import { parseApiKeys } from "../gateway/api-keys.ts";
import { modelArchitectureOf, readModelConfig } from "../model/config.ts";
import { tinyModelCurrent, writeTinyModel } from "../model/tiny.ts";
import { type PlacementPlan, planPlacement } from "../moe/placement.ts";
import { serializePlan } from "../moe/plan-json.ts";
import { cacheDir } from "../util/cache-dir.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { localGateways, localPrefills, localScaling } from "./autoscale.ts";
import { localDevices, parseDeviceFlag } from "./devices.ts";
import {
  envFromObjects,
  gatewaySecrets,
  gatewaySecretsNotes,
  type SecretsRead,
  writeGatewaySecretFiles,
} from "./gateway-secrets.ts";
import { hubSnapshot } from "./hf-hub.ts";
import { holdsModel, objectsOf } from "./objects.ts";
import { UP_WATCHED_ENV } from "./parent-watch.ts";
import { formatBytes } from "./progress.ts";
import { ProgressBoard } from "./progress-board.ts";

/** up's flags (src/cli/commands/up.ts parses them with these options). */
export const UP_OPTIONS = {
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
export type UpFlags = ReturnType<typeof parseArgs<{ options: typeof UP_OPTIONS }>>["values"];

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
 * Everything `up` decides and writes before it starts a process: the manifest (and the
 * Secrets of the -f files), where each role runs, the model's checkpoint (fetched from the
 * Hub or created when it is a tiny preset), the placement plan, and the run folder with the
 * plan, the chat template and the gateways' Secrets files; said on `board` as it goes.
 */
export async function prepareRun(values: UpFlags, files: ReturnType<typeof localFiles>) {
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
  const secretsRead: SecretsRead = { gateway: gatewaySecrets(m, objects) };
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

/** What prepareRun decided and wrote. */
export type PreparedRun = Awaited<ReturnType<typeof prepareRun>>;

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
