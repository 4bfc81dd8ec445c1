// Reads and validates `DeepSeekModel` manifests for local use (`expertmesh up`, `plan -f`)
// with the same schema, defaults and cross-field rules the API server applies to the CRD.
import { readFileSync } from "node:fs";
import { Value } from "@sinclair/typebox/value";
import { parseAllDocuments } from "yaml";
import { ExpertMeshError } from "../util/errors.ts";
import { type ModelArchitecture, resolveArchitecture } from "./presets.ts";
import { crossFieldErrors } from "./rules.ts";
import { API_VERSION, type DeepSeekModel, DeepSeekModelSchema, KIND } from "./schema.ts";

export type { DeepSeekModel };
export { API_VERSION, KIND };

/** Reads and validates a manifest file. Throws EM_MANIFEST_READ, _PARSE or _INVALID. */
export function readManifest(path: string): DeepSeekModel {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ExpertMeshError("EM_MANIFEST_READ", `cannot read ${path}: ${String(err)}`, {
      cause: err,
    });
  }
  return parseManifest(text, path);
}

/** Largest manifest read: a DeepSeekModel is a few KB; YAML's duplicate-key check grows
 * much faster than the text (a 738 KB file of labels took 92 s). */
export const MAX_MANIFEST_BYTES = 256 * 1024;

/**
 * The documents of a manifest file's YAML, as plain values (`source` names it in messages).
 * Throws EM_MANIFEST_PARSE for text past MAX_MANIFEST_BYTES or that is not YAML.
 */
export function parseDocuments(text: string, source: string): unknown[] {
  if (Buffer.byteLength(text) > MAX_MANIFEST_BYTES)
    throw new ExpertMeshError(
      "EM_MANIFEST_PARSE",
      `${source} is larger than ${MAX_MANIFEST_BYTES / 1024} KiB (${Buffer.byteLength(text)} bytes): not a manifest (those are a few KB)`,
    );
  try {
    return parseAllDocuments(text).map((d) => {
      if (d.errors.length) throw d.errors[0];
      return d.toJS();
    });
  } catch (err) {
    throw new ExpertMeshError("EM_MANIFEST_PARSE", `${source} is not valid YAML: ${String(err)}`, {
      cause: err,
    });
  }
}

/**
 * Parses manifest YAML (the one DeepSeekModel of a file; other kinds of documents, a volume
 * say, are skipped) and validates it; `source` names it in messages. Defaults are applied as
 * the API server would.
 */
export function parseManifest(text: string, source = "manifest"): DeepSeekModel {
  const docs = parseDocuments(text, source);
  const invalid = (field: string, msg: string): never => {
    throw new ExpertMeshError("EM_MANIFEST_INVALID", `${source}: ${field}: ${msg}`);
  };
  const objects = docs.filter(
    (d): d is Record<string, unknown> => typeof d === "object" && d !== null && !Array.isArray(d),
  );
  const models = objects.filter((d) => d["kind"] === KIND);
  if (models.length > 1)
    invalid(
      "(document)",
      `holds ${models.length} ${KIND}s: give one per file (only one would run)`,
    );
  const doc = models[0] ?? objects[0];
  if (!doc) return invalid("(document)", `no ${KIND} found`);
  if (doc["apiVersion"] !== API_VERSION)
    invalid("apiVersion", `must be '${API_VERSION}', got ${JSON.stringify(doc["apiVersion"])}`);
  if (doc["kind"] !== KIND)
    invalid("kind", `must be '${KIND}', got ${JSON.stringify(doc["kind"])}`);
  return validateModel(doc, invalid);
}

interface SchemaNode {
  type?: unknown;
  properties?: Record<string, unknown>;
  patternProperties?: Record<string, unknown>;
  additionalProperties?: unknown;
  items?: unknown;
  anyOf?: { const?: unknown }[];
  "x-kubernetes-preserve-unknown-fields"?: boolean;
}

/**
 * The first place where the document's shape leaves the schema, checked before defaults:
 * a list where an object belongs (TypeBox's Value.Default merged `experts: [- shards: 4]`
 * into the default experts) or a field the schema does not have (kubectl's strict field
 * validation refuses it; read here it would be ignored, a typo silently lost). Objects that
 * keep unknown fields (metadata, affinity) are not looked into.
 */
function shapeError(
  schema: unknown,
  value: unknown,
  path: string,
): { field: string; message: string } | undefined {
  const s = schema as SchemaNode;
  // The API server keeps an integer in 64 bits: 1e+308 is refused, not read as a number.
  if (
    s.type === "integer" &&
    typeof value === "number" &&
    !(value >= -(2 ** 63) && value < 2 ** 63)
  )
    return { field: path, message: `Expected an integer of 64 bits at most (got ${value})` };
  if (typeof value !== "object" || value === null) return undefined;
  const at = (key: string) => (path ? `${path}.${key}` : key);
  if (s.type === "array" && Array.isArray(value)) {
    for (const [i, v] of value.entries()) {
      const found = shapeError(s.items, v, at(String(i)));
      if (found) return found;
    }
    return undefined;
  }
  if (s.type !== "object") return undefined;
  if (Array.isArray(value))
    return { field: path || "(document)", message: "Expected object (got a list)" };
  if (s.additionalProperties === true || s["x-kubernetes-preserve-unknown-fields"])
    return undefined;
  const entries = Object.entries(value as Record<string, unknown>);
  if (s.patternProperties) {
    const sub = Object.values(s.patternProperties)[0];
    for (const [key, v] of entries) {
      const found = shapeError(sub, v, at(key));
      if (found) return found;
    }
    return undefined;
  }
  const known = Object.keys(s.properties ?? {});
  for (const [key, v] of entries) {
    const sub = s.properties?.[key];
    if (sub === undefined) {
      const near = known.find((k) => editDistance(k.toLowerCase(), key.toLowerCase()) <= 2);
      return {
        field: at(key),
        message:
          `unknown field${near ? ` (did you mean '${near}'?)` : ""}; ` +
          `${path || "the document"} has ${known.join(", ")}`,
      };
    }
    const found = shapeError(sub, v, at(key));
    if (found) return found;
  }
  return undefined;
}

/** Levenshtein distance (for suggesting a field name). */
function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++)
      row[j] = Math.min(
        prev[j]! + 1,
        row[j - 1]! + 1,
        prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    prev = row;
  }
  return prev[b.length]!;
}

/**
 * Drops the fields whose value is null, as the API server does before defaulting (none of
 * the schema's fields is nullable): `maxModelLen: ~` means unset, under kubectl as here.
 * Objects that keep unknown fields (metadata's labels and annotations, affinity) are left.
 */
function pruneNulls(schema: unknown, value: unknown): void {
  const s = schema as SchemaNode | undefined;
  if (s === undefined || typeof value !== "object" || value === null) return;
  if (Array.isArray(value)) {
    for (const v of value) pruneNulls(s.items, v);
    return;
  }
  if (s.type !== "object" || s["x-kubernetes-preserve-unknown-fields"]) return;
  const o = value as Record<string, unknown>;
  for (const [key, v] of Object.entries(o)) {
    const sub =
      s.properties?.[key] ??
      (s.patternProperties ? Object.values(s.patternProperties)[0] : undefined) ??
      (typeof s.additionalProperties === "object" ? s.additionalProperties : undefined);
    if (v === null && sub !== undefined) delete o[key];
    else pruneNulls(sub, v);
  }
}

/** Fields of an object's metadata that the API server knows (ObjectMeta's). */
const OBJECT_META_FIELDS = new Set([
  "name",
  "generateName",
  "namespace",
  "selfLink",
  "uid",
  "resourceVersion",
  "generation",
  "creationTimestamp",
  "deletionTimestamp",
  "deletionGracePeriodSeconds",
  "labels",
  "annotations",
  "ownerReferences",
  "finalizers",
  "managedFields",
]);

/** Applies defaults, checks the schema and the cross-field rules; returns a typed copy. */
export function validateModel(
  doc: unknown,
  invalid: (field: string, msg: string) => never,
): DeepSeekModel {
  doc = structuredClone(doc);
  pruneNulls(DeepSeekModelSchema, doc);
  const shape = shapeError(DeepSeekModelSchema, doc, "");
  if (shape) invalid(shape.field, shape.message);
  // A status is not the spec: past the unknown fields (refused when the API server decodes
  // it), the API server drops it (the status subresource's), and so does this.
  if (typeof doc === "object" && doc !== null) delete (doc as Record<string, unknown>)["status"];
  // kubectl's strict field validation refuses unknown metadata fields too.
  const meta = (doc as Record<string, unknown>)["metadata"];
  if (typeof meta === "object" && meta !== null && !Array.isArray(meta))
    for (const key of Object.keys(meta))
      if (!OBJECT_META_FIELDS.has(key))
        invalid(
          `metadata.${key}`,
          "unknown field; metadata has the fields of a Kubernetes ObjectMeta",
        );
  const value = Value.Default(DeepSeekModelSchema, doc) as Record<string, any>;
  const first = Value.Errors(DeepSeekModelSchema, value).First();
  if (first) {
    const field = first.path.replace(/^\//, "").replaceAll("/", ".") || "(document)";
    const got = first.value === undefined ? "missing" : `got ${JSON.stringify(first.value)}`;
    // An enum's error is "Expected union value": say which values it takes.
    const choices = (first.schema as SchemaNode).anyOf;
    const message = choices?.every((c) => typeof c.const === "string")
      ? `must be one of ${choices.map((c) => c.const).join(", ")}`
      : first.message;
    invalid(field, `${message} (${got})`);
  }
  // spec.env is a list map keyed by name (x-kubernetes-list-type): the API server refuses
  // a name given twice.
  const envNames: string[] = (value["spec"]?.["env"] ?? []).map((e: { name: string }) => e.name);
  const twice = envNames.findIndex((n, i) => envNames.indexOf(n) !== i);
  if (twice >= 0)
    invalid(`spec.env[${twice}]`, `Duplicate value: {"name":${JSON.stringify(envNames[twice])}}`);
  const cross = crossFieldErrors(value);
  if (cross.length) invalid(cross[0]!.path, cross.map((e) => e.message).join("; "));
  value["metadata"]["namespace"] ??= "default";
  return value as DeepSeekModel;
}

/** The architecture figures of a model: its preset's, or the ones it states. */
export function architectureOf(model: DeepSeekModel): ModelArchitecture {
  const { preset, architecture } = model.spec.model;
  return resolveArchitecture((preset ?? architecture) as string | ModelArchitecture);
}

/** The name clients use for the model. */
export function servedModelName(model: DeepSeekModel): string {
  return model.spec.servedModelName ?? model.metadata.name;
}

/** How gateways read thinking out of chat answers: as given, else by the preset (R1 thinks). */
export function reasoningParserOf(model: DeepSeekModel): "deepseek-r1" | "deepseek-v3" | "none" {
  const preset = model.spec.model.preset;
  return (
    model.spec.gateway.reasoningParser ??
    (preset === "deepseek-r1" ? "deepseek-r1" : preset === "deepseek-v3.1" ? "deepseek-v3" : "none")
  );
}

/** The model's tool-call format: as given, else by the preset (V3.1 has its own). */
export function toolCallParserOf(model: DeepSeekModel): "deepseek-v3" | "deepseek-v3.1" {
  return (
    model.spec.gateway.toolCallParser ??
    (model.spec.model.preset === "deepseek-v3.1" ? "deepseek-v3.1" : "deepseek-v3")
  );
}

/**
 * The gateway's serving flags a manifest sets (limits, KV cache, parsers, speculation):
 * the same for the operator's pods and `expertmesh up`'s process, which add their own
 * ports and addresses.
 */
export function gatewayArgs(model: DeepSeekModel, role: GatewayRole = "gateway"): string[] {
  const g = model.spec.gateway;
  return [
    `--served-model-name=${servedModelName(model)}`,
    ...(g.modelAliases ?? []).map((a) => `--served-model-alias=${a}`),
    `--max-queue-depth=${g.limits.maxQueueDepth}`,
    `--max-batch-tokens=${g.limits.maxBatchTokens}`,
    `--max-running=${g.limits.maxRunning}`,
    `--max-request-bytes=${g.limits.maxRequestBytes}`,
    ...(g.limits.maxModelLen ? [`--max-model-len=${g.limits.maxModelLen}`] : []),
    ...kvCacheArgs(model),
    ...(g.prefixCaching ? [] : ["--no-prefix-caching"]),
    ...prefixCacheRemoteArgs(model),
    ...(g.schedulingPolicy === "priority" ? ["--scheduling-policy=priority"] : []),
    ...(g.priorityAgingSeconds ? [`--priority-aging=${g.priorityAgingSeconds}`] : []),
    ...(g.streamKeepaliveSeconds !== undefined
      ? [`--stream-keepalive=${g.streamKeepaliveSeconds}`]
      : []),
    ...(g.logRequests ? ["--log-requests"] : []),
    ...(g.tracing ? [`--otlp-traces-endpoint=${g.tracing.otlpEndpoint}`] : []),
    ...(g.tracing?.protocol === "grpc" ? ["--otlp-traces-protocol=grpc"] : []),
    ...(g.tracing && g.tracing.sampleRatio < 1
      ? [`--otlp-traces-sample-ratio=${g.tracing.sampleRatio}`]
      : []),
    `--reasoning-parser=${reasoningParserOf(model)}`,
    ...(g.thinkingTokenBudget !== undefined
      ? [`--thinking-token-budget=${g.thinkingTokenBudget}`]
      : []),
    `--tool-call-parser=${toolCallParserOf(model)}`,
    ...speculativeArgs(model),
    ...samplingArgs(model),
    ...disaggregationArgs(model, role),
  ];
}

/**
 * Which gateways: those that serve clients (behind the Service), or with
 * spec.gateway.disaggregation, the prefill gateways that compute their long prompts.
 */
export type GatewayRole = "gateway" | "prefill";

/** The disaggregated prefill flags of a `role` gateway (none without spec.gateway.disaggregation). */
export function disaggregationArgs(model: DeepSeekModel, role: GatewayRole): string[] {
  const d = model.spec.gateway.disaggregation;
  if (d === undefined) return [];
  return role === "prefill"
    ? ["--disaggregation-mode=prefill"]
    : [
        "--disaggregation-mode=decode",
        `--disaggregation-min-tokens=${d.minPromptTokens}`,
        `--disaggregation-timeout=${d.timeoutSeconds}`,
      ];
}

/**
 * The gateway's --chat-template flag (none without spec.gateway.chatTemplate), with the file
 * where the caller puts the template: the plan ConfigMap's mount in a pod, the run folder of
 * `up`.
 */
export function chatTemplateArgs(model: DeepSeekModel, file: string): string[] {
  return model.spec.gateway.chatTemplate === undefined ? [] : [`--chat-template=${file}`];
}

/**
 * The gateway's sampling default flags (spec.gateway.sampling): --generation-config=none
 * when asked, the fields set as --override-generation-config JSON.
 */
export function samplingArgs(model: DeepSeekModel): string[] {
  const { generationConfig, temperature, topP, topK, minP, repetitionPenalty } =
    model.spec.gateway.sampling;
  const fields: [string, number | undefined][] = [
    ["temperature", temperature],
    ["top_p", topP],
    ["top_k", topK],
    ["min_p", minP],
    ["repetition_penalty", repetitionPenalty],
  ];
  const set = Object.fromEntries(fields.filter(([, v]) => v !== undefined));
  return [
    ...(generationConfig === "none" ? ["--generation-config=none"] : []),
    ...(Object.keys(set).length ? [`--override-generation-config=${JSON.stringify(set)}`] : []),
  ];
}

/**
 * The flags of both roles for spec.model: `--dtype` when the manifest serves the weights in
 * another dtype than the checkpoint's (none for auto), `--cpu-matmul=bf16` and
 * `--batch-invariant` when asked for.
 */
export function modelArgs(model: DeepSeekModel): string[] {
  const { dtype, cpuMatmul, batchInvariant } = model.spec.model;
  return [
    ...(model.spec.logFormat === "json" ? ["--log-format=json"] : []),
    ...(dtype === "auto" ? [] : [`--dtype=${dtype}`]),
    ...(cpuMatmul === "bf16" ? ["--cpu-matmul=bf16"] : []),
    ...(batchInvariant ? ["--batch-invariant"] : []),
  ];
}

/** The gateway's KV cache flags (spec.gateway.kvCache). */
export function kvCacheArgs(model: DeepSeekModel): string[] {
  const k = model.spec.gateway.kvCache;
  return [
    `--kv-cache-bytes=${k.bytes}`,
    `--kv-cache-dtype=${k.dtype}`,
    `--block-size=${k.blockSize}`,
  ];
}

/**
 * The gateway's disk tier flags (spec.gateway.kvCache.diskBytes; none when 0), with the
 * folder where the caller puts it: an emptyDir in a pod (or the shared claim's volume), a
 * folder that outlives `up`'s runs.
 */
export function prefixCacheDiskArgs(model: DeepSeekModel, dir: string): string[] {
  const {
    diskBytes: bytes,
    diskSharedClaim,
    diskSharedStorageClassName,
  } = model.spec.gateway.kvCache;
  if (bytes <= 0) return [];
  const shared = diskSharedClaim !== undefined || diskSharedStorageClassName !== undefined;
  return [
    `--prefix-cache-disk=${dir}`,
    `--prefix-cache-disk-bytes=${bytes}`,
    ...(shared ? ["--prefix-cache-disk-shared"] : []),
  ];
}

/** The serving gateways' Files and Batch API flags (spec.gateway.batch; none without it). */
export function batchArgs(model: DeepSeekModel, dir: string): string[] {
  const b = model.spec.gateway.batch;
  if (b === undefined) return [];
  return [
    `--files-dir=${dir}`,
    `--files-max-bytes=${b.maxFileBytes}`,
    `--files-max-total=${b.storageBytes}`,
    `--batch-concurrency=${b.concurrency}`,
  ];
}

/** The NATS tier's bucket of a model: one per DeepSeekModel (names take no dots). */
export function prefixCacheBucket(model: DeepSeekModel): string {
  const { namespace, name } = model.metadata;
  return `expertmesh-prefix-${namespace ?? "default"}-${name}`.replace(/[^A-Za-z0-9_-]/g, "_");
}

/** The gateway's NATS tier flags (spec.gateway.kvCache.remoteBytes; none when 0). */
export function prefixCacheRemoteArgs(model: DeepSeekModel): string[] {
  const bytes = model.spec.gateway.kvCache.remoteBytes;
  if (bytes <= 0) return [];
  const replicas = model.spec.gateway.kvCache.remoteReplicas ?? 1;
  return [
    `--prefix-cache-remote=${prefixCacheBucket(model)}`,
    `--prefix-cache-remote-bytes=${bytes}`,
    ...(replicas > 1 ? [`--prefix-cache-remote-replicas=${replicas}`] : []),
  ];
}

/** The gateway's speculative decoding flags (none when spec.gateway.speculative is absent). */
export function speculativeArgs(model: DeepSeekModel): string[] {
  const s = model.spec.gateway.speculative;
  if (!s) return [];
  if (s.method === "mtp")
    return ["--speculative-method=mtp", `--speculative-tokens=${s.numTokens ?? 1}`];
  return [
    `--speculative-tokens=${s.numTokens ?? 1}`,
    `--prompt-lookup-max=${s.promptLookupMax}`,
    `--prompt-lookup-min=${s.promptLookupMin}`,
  ];
}
