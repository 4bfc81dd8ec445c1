// Cross-field rules of the DeepSeekModel API, each written twice side by side: as CEL for
// the API server (x-kubernetes-validations in the CRD) and as TypeScript for local mode.
// The CEL text and the check live in one entry so they cannot drift apart silently; a
// test applies invalid manifests to the real API server and compares the messages.
import { KV_CACHE_DTYPES, kvRowBytes } from "../engine/kv-format.ts";
import { presetCache, presetNames, resolveArchitecture } from "./presets.ts";
import { quantityValue } from "./quantity.ts";

export interface CrossFieldRule {
  /** Dotted path of the object the rule is attached to (CEL's `self`). */
  readonly path: string;
  /** CEL expression; true means valid. */
  readonly rule: string;
  readonly message: string;
  /** The same rule on the defaulted object at `path`. */
  readonly check: (self: Record<string, any>) => boolean;
}

/** CEL map literal preset -> routed experts, e.g. {'deepseek-v3': 256, ...}. */
function presetExpertsCel(): string {
  return `{${presetNames()
    .map((n) => `'${n}': ${resolveArchitecture(n).routedExperts}`)
    .join(", ")}}`;
}

/** CEL for the routed experts of spec.model, guarded so that it never errors. */
const hasModelFigures = "(has(self.model.architecture) || has(self.model.preset))";
function routedCel(): string {
  return `(has(self.model.architecture) ? self.model.architecture.routedExperts : ${presetExpertsCel()}[self.model.preset])`;
}
function routedOf(spec: Record<string, any>): number | undefined {
  const m = spec["model"] ?? {};
  if (m.architecture) return m.architecture.routedExperts;
  if (typeof m.preset === "string" && presetNames().includes(m.preset))
    return resolveArchitecture(m.preset).routedExperts;
  return undefined;
}

/** Bytes of one layer's KV row of one token, per preset and spec.gateway.kvCache.dtype. */
function rowBytes(preset: string, dtype: string): number {
  const c = presetCache(preset);
  const d = (KV_CACHE_DTYPES as Record<string, "f32" | "bf16" | "fp8">)[dtype]!;
  return kvRowBytes(d, c.kvLoraRank, c.ropeDim);
}
/** Layers whose rows the gateway keeps: the blocks, and the MTP layer with MTP drafts. */
function cachedLayers(numLayers: number, gateway: GatewaySpecPart | undefined): number {
  return numLayers + (gateway?.speculative?.method === "mtp" ? 1 : 0);
}
/** What the KV-budget rules read of spec.gateway (defaulted). */
interface GatewaySpecPart {
  readonly kvCache: { bytes: number; dtype: string; blockSize: number };
  readonly speculative?: { method?: string };
}
/** CEL for cachedLayers' MTP term (the MTP layer's rows are one layer more). */
const MTP_LAYER_CEL =
  "(has(self.gateway.speculative) && has(self.gateway.speculative.method) && self.gateway.speculative.method == 'mtp' ? 1 : 0)";
const KV_DTYPE_NAMES = ["float32", "bfloat16", "fp8"] as const;
/**
 * CEL for the bytes of one token's rows of spec.model.architecture (kv-format.ts's
 * kvRowBytes: f32 and bf16 rows of kvLoraRank + qkRopeHeadDim values; fp8 rows of e4m3
 * latent codes, an f32 scale per 128 of them and a bf16 rope part), over numLayers.
 */
const archTokenBytesCel = (() => {
  const a = "self.model.architecture";
  const C = `${a}.kvLoraRank`;
  const dr = `${a}.qkRopeHeadDim`;
  return (
    `((self.gateway.kvCache.dtype == 'float32' ? (${C} + ${dr}) * 4 : ` +
    `self.gateway.kvCache.dtype == 'bfloat16' ? (${C} + ${dr}) * 2 : ` +
    `${C} + 4 * ((${C} + 127) / 128) + 2 * ${dr}) * (${a}.numLayers + ${MTP_LAYER_CEL}))`
  );
})();
/** CEL for one token's row bytes over the preset's cached layers (cachedLayers). */
function tokenBytesCel(): string {
  const rows = `{${presetNames()
    .map((n) => `'${n}': {${KV_DTYPE_NAMES.map((d) => `'${d}': ${rowBytes(n, d)}`).join(", ")}}`)
    .join(", ")}}`;
  const layers = `{${presetNames()
    .map((n) => `'${n}': ${resolveArchitecture(n).numLayers}`)
    .join(", ")}}`;
  return `(${rows}[self.model.preset][self.gateway.kvCache.dtype] * (${layers}[self.model.preset] + ${MTP_LAYER_CEL}))`;
}
function contextCel(): string {
  return `{${presetNames()
    .map((n) => `'${n}': ${presetCache(n).context}`)
    .join(", ")}}`;
}
/** Tokens a gateway's KV cache holds (whole blocks), as the gateway computes it. */
function kvCapacity(preset: string, gateway: GatewaySpecPart) {
  const kv = gateway.kvCache;
  const token =
    rowBytes(preset, kv.dtype) * cachedLayers(resolveArchitecture(preset).numLayers, gateway);
  return Math.floor(kv.bytes / (kv.blockSize * token)) * kv.blockSize;
}

/** A resource name in Kubernetes' own domains (kubernetes.io, *.kubernetes.io); `[.]`, not an
 * escape, as CEL's string literals would read one. */
const KUBERNETES_DOMAIN_RE = "^([^/]*[.])?kubernetes[.]io/";

/**
 * A label key (Kubernetes' qualified name): an optional DNS subdomain prefix of at most 253
 * characters and a '/', then a name of at most 63 characters.
 */
export const LABEL_KEY_RE =
  "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

export function isLabelKey(k: string): boolean {
  return new RegExp(LABEL_KEY_RE).test(k) && (!k.includes("/") || k.indexOf("/") <= 253);
}
/** The same in CEL, of the string `v`. */
const labelKeyCel = (v: string) =>
  `${v}.matches('${LABEL_KEY_RE}') && (!${v}.contains('/') || ${v}.indexOf('/') <= 253)`;

/** A label selector (spec.scheduling's affinity and topology spread constraints). */
interface Selector {
  readonly matchLabels?: Record<string, string>;
  readonly matchExpressions?: readonly { key: string; operator: string; values?: string[] }[];
}
/** A node selector term's requirement. */
interface NodeRequirement {
  readonly key: string;
  readonly operator: string;
  readonly values?: readonly string[];
}
/** A node selector term. */
interface NodeTerm {
  readonly matchExpressions?: readonly NodeRequirement[];
  readonly matchFields?: readonly NodeRequirement[];
}
/** A pod (anti-)affinity term. */
interface PodTerm {
  readonly labelSelector?: Selector;
  readonly namespaceSelector?: Selector;
  readonly topologyKey: string;
  readonly matchLabelKeys?: readonly string[];
  readonly mismatchLabelKeys?: readonly string[];
}

/** Pod (anti-)affinity terms, required and preferred. */
interface PodAffinityPart {
  readonly requiredDuringSchedulingIgnoredDuringExecution?: readonly PodTerm[];
  readonly preferredDuringSchedulingIgnoredDuringExecution?: readonly {
    podAffinityTerm: PodTerm;
  }[];
}
/** What the affinity rules read of spec.scheduling. */
interface SchedulingPart {
  readonly affinity?: {
    readonly nodeAffinity?: {
      readonly requiredDuringSchedulingIgnoredDuringExecution?: { nodeSelectorTerms: NodeTerm[] };
      readonly preferredDuringSchedulingIgnoredDuringExecution?: { preference: NodeTerm }[];
    };
    readonly podAffinity?: PodAffinityPart;
    readonly podAntiAffinity?: PodAffinityPart;
  };
}

/** Every node selector term of spec.scheduling `s`'s affinity: required, and preferred. */
function nodeTerms(s: SchedulingPart): NodeTerm[] {
  const na = s.affinity?.nodeAffinity;
  return [
    ...(na?.requiredDuringSchedulingIgnoredDuringExecution?.nodeSelectorTerms ?? []),
    ...(na?.preferredDuringSchedulingIgnoredDuringExecution ?? []).map((p) => p.preference),
  ];
}
/** CEL: `term` (of a term's CEL) holds for every node selector term of self.affinity. */
function NODE_TERMS_CEL(term: (t: string) => string): string {
  const na = "self.affinity.nodeAffinity";
  const required = `${na}.requiredDuringSchedulingIgnoredDuringExecution`;
  const preferred = `${na}.preferredDuringSchedulingIgnoredDuringExecution`;
  return `(!has(self.affinity) || !has(${na}) || ((!has(${required}) || ${required}.nodeSelectorTerms.all(t, ${term("t")})) && (!has(${preferred}) || ${preferred}.all(p, ${term("p.preference")}))))`;
}
/** Every pod affinity and anti-affinity term of spec.scheduling `s`: required, and preferred. */
function podTerms(s: SchedulingPart): PodTerm[] {
  const a = s.affinity;
  return [a?.podAffinity, a?.podAntiAffinity].flatMap((p) => [
    ...(p?.requiredDuringSchedulingIgnoredDuringExecution ?? []),
    ...(p?.preferredDuringSchedulingIgnoredDuringExecution ?? []).map((w) => w.podAffinityTerm),
  ]);
}
/** CEL: `term` holds for every pod affinity and anti-affinity term of self.affinity. */
function POD_TERMS_CEL(term: (t: string) => string): string {
  const of = (p: string) => {
    const required = `self.affinity.${p}.requiredDuringSchedulingIgnoredDuringExecution`;
    const preferred = `self.affinity.${p}.preferredDuringSchedulingIgnoredDuringExecution`;
    return `(!has(self.affinity.${p}) || ((!has(${required}) || ${required}.all(t, ${term("t")})) && (!has(${preferred}) || ${preferred}.all(w, ${term("w.podAffinityTerm")}))))`;
  };
  return `(!has(self.affinity) || (${of("podAffinity")} && ${of("podAntiAffinity")}))`;
}
/**
 * Whether a requirement's values suit its operator as a label selector's does: In and NotIn
 * need some, Exists and DoesNotExist none (also a node requirement's, which adds Gt and Lt).
 */
function setValuesOk(e: { operator: string; values?: readonly string[] }): boolean {
  const n = e.values?.length ?? 0;
  return e.operator === "In" || e.operator === "NotIn" ? n > 0 : n === 0;
}
/** The same in CEL, of a requirement `e`. */
const SET_VALUES_CEL = (e: string) =>
  `(${e}.operator in ['In', 'NotIn'] ? has(${e}.values) && size(${e}.values) > 0 : !has(${e}.values) || size(${e}.values) == 0)`;
/** Whether a node requirement's values suit its operator (Gt and Lt: one whole number). */
function nodeRequirementOk(e: NodeRequirement): boolean {
  if (e.operator !== "Gt" && e.operator !== "Lt") return setValuesOk(e);
  return e.values?.length === 1 && INTEGER_RE.test(e.values[0]!);
}
/**
 * A value Gt and Lt compare with: a whole number (the scheduler parses it as an int64; the
 * API server checks only that it is a label value, which has no sign).
 */
const INTEGER_RE = /^[0-9]{1,19}$/;
/** The same in CEL, of a node requirement `e`. */
const NODE_REQUIREMENT_CEL = (e: string) =>
  `(${e}.operator in ['Gt', 'Lt'] ? has(${e}.values) && size(${e}.values) == 1 && ${e}.values[0].matches('${INTEGER_RE.source}') : ${SET_VALUES_CEL(e)})`;
/** Whether a label selector's requirements' values suit their operators. */
function selectorOk(sel: Selector | undefined): boolean {
  return (sel?.matchExpressions ?? []).every(setValuesOk);
}
/** The same in CEL, of a label selector `sel` (maybe absent). */
const SELECTOR_CEL = (sel: string) =>
  `(!has(${sel}) || !has(${sel}.matchExpressions) || ${sel}.matchExpressions.all(e, ${SET_VALUES_CEL("e")}))`;
/** CEL: the matchLabels keys of label selector `sel` (maybe absent) are label keys. */
const MATCH_LABELS_KEYS_CEL = (sel: string) =>
  `(!has(${sel}) || !has(${sel}.matchLabels) || ${sel}.matchLabels.all(k, ${labelKeyCel("k")}))`;

/** Environment variables the operator sets in the model's containers (spec.env may not). */
export const RESERVED_ENV: readonly string[] = [
  "POD_NAME",
  "POD_NAMESPACE",
  "HF_REPO",
  "HF_REVISION",
  "HF_TOKEN",
  "HF_HOME",
  "MODEL_DIR",
];
/** Pod labels the operator sets (spec.podMetadata.labels may not; nor expertmesh.io/ keys). */
export const RESERVED_LABELS: readonly string[] = [
  "app.kubernetes.io/name",
  "app.kubernetes.io/instance",
  "app.kubernetes.io/managed-by",
  "app.kubernetes.io/component",
  "pod-template-hash",
];

/** An extended resource's name, `<DNS subdomain>/<name>` (nvidia.com/gpu), unanchored. */
export const EXTENDED_RESOURCE =
  "[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?";

/**
 * A container resource's name: a standard one (cpu, memory, ephemeral-storage, hugepages-
 * of a size), or an extended one qualified by a domain (nvidia.com/gpu), outside
 * kubernetes.io and not starting "requests." (as the API server checks a PodSpec's).
 */
const RESOURCE_NAME_RE = `^(cpu|memory|ephemeral-storage|hugepages-[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|[kMGTPE])?|${EXTENDED_RESOURCE})$`;

export function isResourceName(k: string): boolean {
  return (
    new RegExp(RESOURCE_NAME_RE).test(k) &&
    !k.includes("kubernetes.io/") &&
    !k.startsWith("requests.") &&
    (!k.includes("/") || k.indexOf("/") <= 253)
  );
}
const resourceNameCel = (v: string) =>
  `${v}.matches('${RESOURCE_NAME_RE}') && !${v}.contains('kubernetes.io/') && !${v}.startsWith('requests.') && (!${v}.contains('/') || ${v}.indexOf('/') <= 253)`;

/**
 * The rules of a role's resources (gateway or experts, at `path`): resource names, and no
 * request above its limit (the API server refuses such a container, but only when the
 * operator applies the workloads).
 */
function resourceRules(path: string): CrossFieldRule[] {
  const field = path.replace(/^spec\./, "");
  return [
    {
      path,
      rule: `(!has(self.requests) || self.requests.all(k, ${resourceNameCel("k")})) && (!has(self.limits) || self.limits.all(k, ${resourceNameCel("k")}))`,
      message: `${field} requests and limits must name container resources: cpu, memory, ephemeral-storage, hugepages-<size>, or an extended resource qualified by its domain (e.g. example.com/device)`,
      check: (s) =>
        [...Object.keys(s["requests"] ?? {}), ...Object.keys(s["limits"] ?? {})].every(
          isResourceName,
        ),
    },
    {
      path,
      rule: "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
      message: `${field}: a request must not exceed its limit`,
      check: (s) =>
        Object.entries<string | number>(s["requests"] ?? {}).every(([k, q]) => {
          const limit = s["limits"]?.[k];
          if (limit === undefined) return true;
          const [r, l] = [quantityValue(q), quantityValue(limit)];
          return r === null || l === null || r <= l;
        }),
    },
  ];
}

export const CROSS_FIELD_RULES: readonly CrossFieldRule[] = [
  {
    path: "spec.model",
    rule: "has(self.preset) != has(self.architecture)",
    message: "set exactly one of model.preset and model.architecture",
    check: (s) => "preset" in s !== "architecture" in s,
  },
  {
    path: "spec.model.source",
    rule: "has(self.pvc) != has(self.huggingFace)",
    message: "set exactly one of model.source.pvc and model.source.huggingFace",
    check: (s) => "pvc" in s !== "huggingFace" in s,
  },
  {
    path: "spec.model.architecture",
    rule: "self.firstDenseLayers < self.numLayers",
    message: "architecture.firstDenseLayers must be less than numLayers (at least one MoE layer)",
    check: (s) => s["firstDenseLayers"] < s["numLayers"],
  },
  {
    path: "spec.model.architecture",
    rule: "self.expertsPerToken <= self.routedExperts",
    message: "architecture.expertsPerToken must not exceed routedExperts",
    check: (s) => s["expertsPerToken"] <= s["routedExperts"],
  },
  {
    path: "spec",
    rule: `!${hasModelFigures} || self.experts.shards <= ${routedCel()}`,
    message: "experts.shards must not exceed the model's routed experts (a shard would hold none)",
    check: (s) => {
      const routed = routedOf(s);
      return routed === undefined || s["experts"].shards <= routed;
    },
  },
  {
    path: "spec",
    rule: `!${hasModelFigures} || self.experts.redundantExperts == 0 || (${routedCel()} + self.experts.redundantExperts) % self.experts.shards == 0`,
    message:
      "routed experts + experts.redundantExperts must be a multiple of experts.shards (equal slots per shard)",
    check: (s) => {
      const routed = routedOf(s);
      const { redundantExperts, shards } = s["experts"];
      return (
        routed === undefined || redundantExperts === 0 || (routed + redundantExperts) % shards === 0
      );
    },
  },
  {
    path: "spec",
    rule: `!${hasModelFigures} || self.experts.redundantExperts <= ${routedCel()} * (self.experts.shards - 1)`,
    message:
      "experts.redundantExperts must not exceed routed experts * (shards - 1): no shard holds two copies of an expert",
    check: (s) => {
      const routed = routedOf(s);
      const { redundantExperts, shards } = s["experts"];
      return routed === undefined || redundantExperts <= routed * (shards - 1);
    },
  },
  {
    path: "spec.experts.replicas",
    // has(): the rule also runs on the unexpanded `default: {}` when the CRD is created.
    rule: "!has(self.min) || !has(self.max) || self.min <= self.max",
    message: "experts.replicas.min must not exceed experts.replicas.max",
    check: (s) => s["min"] <= s["max"],
  },
  {
    path: "spec.gateway",
    rule: "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
    message: "gateway.minReplicas must not exceed gateway.maxReplicas",
    check: (s) => s["minReplicas"] <= s["maxReplicas"],
  },
  {
    // The gateway refuses to start (EM_KV_BUDGET) when its cache cannot hold one sequence
    // of the context it serves; known for presets (their MLA figures are known).
    path: "spec",
    rule:
      "!has(self.model.preset) || !has(self.gateway.kvCache) || !has(self.gateway.kvCache.bytes) || !has(self.gateway.kvCache.dtype) || !has(self.gateway.kvCache.blockSize) || " +
      `self.gateway.kvCache.bytes / (self.gateway.kvCache.blockSize * ${tokenBytesCel()}) * self.gateway.kvCache.blockSize >= ` +
      `(has(self.gateway.limits) && has(self.gateway.limits.maxModelLen) ? self.gateway.limits.maxModelLen : ${contextCel()}[self.model.preset])`,
    message:
      "gateway.kvCache cannot hold one sequence of gateway.limits.maxModelLen tokens (the model's context when unset; MTP drafts keep one layer more): raise kvCache.bytes, store smaller rows (kvCache.dtype bfloat16 or fp8), or lower limits.maxModelLen",
    check: (s) => {
      const preset = s["model"]?.preset;
      if (typeof preset !== "string" || !presetNames().includes(preset)) return true;
      const g = s["gateway"];
      const want = g.limits?.maxModelLen ?? presetCache(preset).context;
      return kvCapacity(preset, g) >= want;
    },
  },
  {
    path: "spec.gateway",
    rule: "!has(self.kvCache) || !has(self.kvCache.diskBytes) || self.kvCache.diskBytes == 0 || !has(self.prefixCaching) || self.prefixCaching",
    message: "gateway.kvCache.diskBytes (the prefix cache's disk tier) needs gateway.prefixCaching",
    check: (s) => !(s["kvCache"]?.diskBytes > 0) || s["prefixCaching"] !== false,
  },
  {
    path: "spec.gateway.speculative",
    rule: "!has(self.promptLookupMin) || !has(self.promptLookupMax) || self.promptLookupMin <= self.promptLookupMax",
    message: "gateway.speculative.promptLookupMin must not exceed promptLookupMax",
    check: (s) => s["promptLookupMin"] <= s["promptLookupMax"],
  },
  {
    path: "spec.gateway.speculative",
    rule: "(has(self.method) && self.method == 'mtp') || has(self.numTokens)",
    message:
      "gateway.speculative.numTokens is required with method ngram (with mtp it defaults to 1)",
    check: (s) => s["method"] === "mtp" || s["numTokens"] !== undefined,
  },
  {
    // The same check for explicit figures, when they give the MLA dims and the manifest
    // gives the context (an architecture carries no max_position_embeddings).
    path: "spec",
    rule:
      "!has(self.model.architecture) || !has(self.model.architecture.kvLoraRank) || !has(self.model.architecture.qkRopeHeadDim) || " +
      "!has(self.gateway.limits) || !has(self.gateway.limits.maxModelLen) || !has(self.gateway.kvCache) || !has(self.gateway.kvCache.bytes) || " +
      "!has(self.gateway.kvCache.dtype) || !has(self.gateway.kvCache.blockSize) || " +
      `self.gateway.kvCache.bytes / (self.gateway.kvCache.blockSize * ${archTokenBytesCel}) * self.gateway.kvCache.blockSize >= self.gateway.limits.maxModelLen`,
    message:
      "gateway.kvCache cannot hold one sequence of gateway.limits.maxModelLen tokens of model.architecture (numLayers x kvLoraRank + qkRopeHeadDim rows, a layer more with MTP drafts): raise kvCache.bytes, store smaller rows (kvCache.dtype bfloat16 or fp8), or lower limits.maxModelLen",
    check: (s) => {
      const a = s["model"]?.architecture;
      const g = s["gateway"];
      if (!a?.kvLoraRank || !a?.qkRopeHeadDim || !g?.limits?.maxModelLen) return true;
      const d = (KV_CACHE_DTYPES as Record<string, "f32" | "bf16" | "fp8">)[g.kvCache.dtype]!;
      const token = kvRowBytes(d, a.kvLoraRank, a.qkRopeHeadDim) * cachedLayers(a.numLayers, g);
      return (
        Math.floor(g.kvCache.bytes / (g.kvCache.blockSize * token)) * g.kvCache.blockSize >=
        g.limits.maxModelLen
      );
    },
  },
  {
    path: "spec.gateway",
    rule: "!has(self.kvCache) || (!has(self.kvCache.diskSharedClaim) && !has(self.kvCache.diskSharedStorageClassName)) || (has(self.kvCache.diskBytes) && self.kvCache.diskBytes > 0)",
    message:
      "gateway.kvCache.diskSharedClaim or diskSharedStorageClassName (a disk tier the gateways share) needs gateway.kvCache.diskBytes, its budget",
    check: (s) => !diskShared(s["kvCache"]) || s["kvCache"].diskBytes > 0,
  },
  {
    path: "spec.gateway",
    rule: "!has(self.priorityAgingSeconds) || self.priorityAgingSeconds == 0.0 || (has(self.schedulingPolicy) && self.schedulingPolicy == 'priority')",
    message: "gateway.priorityAgingSeconds needs gateway.schedulingPolicy priority",
    check: (s) => !(s["priorityAgingSeconds"] > 0) || s["schedulingPolicy"] === "priority",
  },
  {
    path: "spec.monitoring.podMonitor",
    rule: `!has(self.labels) || self.labels.all(k, ${labelKeyCel("k")})`,
    message:
      "monitoring.podMonitor.labels keys must be label keys: an optional DNS subdomain prefix (at most 253 characters) and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    check: (s) => Object.keys(s["labels"] ?? {}).every(isLabelKey),
  },
  ...resourceRules("spec.gateway.resources"),
  ...resourceRules("spec.experts.resources"),
  {
    path: "spec.scheduling",
    rule: `(!has(self.nodeSelector) || self.nodeSelector.all(k, ${labelKeyCel("k")})) && (!has(self.tolerations) || self.tolerations.all(t, !has(t.key) || t.key == '' || ${labelKeyCel("t.key")}))`,
    message:
      "scheduling.nodeSelector keys and scheduling.tolerations keys must be label keys: an optional DNS subdomain prefix (at most 253 characters) and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    check: (s) =>
      Object.keys(s["nodeSelector"] ?? {}).every(isLabelKey) &&
      (s["tolerations"] ?? []).every(
        (t: { key?: string }) => t.key === undefined || t.key === "" || isLabelKey(t.key),
      ),
  },
  {
    path: "spec.scheduling",
    rule: `!has(self.topologySpreadConstraints) || self.topologySpreadConstraints.all(c, ${labelKeyCel("c.topologyKey")} && (!has(c.matchLabelKeys) || c.matchLabelKeys.all(k, ${labelKeyCel("k")})))`,
    message:
      "scheduling.topologySpreadConstraints topologyKey and matchLabelKeys must be label keys: an optional DNS subdomain prefix (at most 253 characters) and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    check: (s) =>
      (s["topologySpreadConstraints"] ?? []).every(
        (c: { topologyKey: string; matchLabelKeys?: string[] }) =>
          isLabelKey(c.topologyKey) && (c.matchLabelKeys ?? []).every(isLabelKey),
      ),
  },
  {
    path: "spec",
    rule:
      "!has(self.model.batchInvariant) || !self.model.batchInvariant || " +
      "((!has(self.gateway.gpus) || self.gateway.gpus == 0) && (!has(self.experts.gpusPerShard) || self.experts.gpusPerShard == 0))",
    message:
      "model.batchInvariant needs gateway.gpus and experts.gpusPerShard to be 0: only the CPU kernels are batch-invariant",
    check: (s) =>
      s["model"]?.batchInvariant !== true ||
      ((s["gateway"]?.gpus ?? 0) === 0 && (s["experts"]?.gpusPerShard ?? 0) === 0),
  },
  {
    path: "spec.gateway",
    rule: "!has(self.kvCache) || !has(self.kvCache.remoteBytes) || self.kvCache.remoteBytes == 0 || !has(self.prefixCaching) || self.prefixCaching",
    message:
      "gateway.kvCache.remoteBytes (the prefix cache's NATS tier) needs gateway.prefixCaching",
    check: (s) => !(s["kvCache"]?.remoteBytes > 0) || s["prefixCaching"] !== false,
  },
  {
    path: "spec.gateway",
    rule: "!has(self.kvCache) || !has(self.kvCache.remoteBytes) || self.kvCache.remoteBytes == 0 || (!has(self.kvCache.diskSharedClaim) && !has(self.kvCache.diskSharedStorageClassName))",
    message:
      "gateway.kvCache.remoteBytes and a shared disk tier: the gateways share blocks through the NATS bucket, and a disk tier under it is each gateway's own; drop diskSharedClaim (or diskSharedStorageClassName)",
    check: (s) => !(s["kvCache"]?.remoteBytes > 0 && diskShared(s["kvCache"])),
  },
  {
    path: "spec.gateway",
    rule: "!has(self.disaggregation) || (has(self.kvCache) && has(self.kvCache.remoteBytes) && self.kvCache.remoteBytes > 0)",
    message:
      "gateway.disaggregation needs gateway.kvCache.remoteBytes: the prompts' blocks go from the prefill gateways to the others through the NATS tier",
    check: (s) => s["disaggregation"] === undefined || s["kvCache"]?.remoteBytes > 0,
  },
  {
    path: "spec.gateway.disaggregation",
    rule: "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
    message: "gateway.disaggregation.minReplicas must not exceed its maxReplicas",
    check: (s) => s["minReplicas"] <= s["maxReplicas"],
  },
  {
    path: "spec.gateway.tracing",
    rule: "!has(self.protocol) || self.protocol != 'grpc' || self.otlpEndpoint.matches('^https?://[^/?#]+/?$')",
    message:
      "gateway.tracing.otlpEndpoint over gRPC is the collector's address without a path (http://otel-collector:4317; https for TLS)",
    check: (s) => s["protocol"] !== "grpc" || /^https?:\/\/[^/?#]+\/?$/.test(s["otlpEndpoint"]),
  },
  {
    path: "spec.nats",
    rule: "(has(self.credentialsSecret) ? 1 : 0) + (has(self.userSecret) ? 1 : 0) + (has(self.tokenSecret) ? 1 : 0) + (has(self.nkeySecret) ? 1 : 0) <= 1",
    message:
      "nats: give at most one of credentialsSecret, userSecret, tokenSecret and nkeySecret (a NATS connection authenticates one way)",
    check: (s) =>
      ["credentialsSecret", "userSecret", "tokenSecret", "nkeySecret"].filter(
        (k) => s[k] !== undefined,
      ).length <= 1,
  },
  {
    path: "spec.nats",
    rule: "!has(self.url) || !self.url.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')",
    message:
      "nats.url must hold no credentials (user:password@): they would show in every pod's spec and arguments; give them with userSecret, tokenSecret, nkeySecret or credentialsSecret",
    check: (s) => !/^[A-Za-z][A-Za-z0-9+.-]*:\/\/[^/?#]*@/.test(s["url"] ?? ""),
  },
  ...(["experts", "gateway"] as const).map(
    (role): CrossFieldRule => ({
      // Kubernetes refuses a Deployment whose strategy may neither surge nor stop a pod.
      path: `spec.${role}.rollingUpdate`,
      rule: "!has(self.maxSurge) || !has(self.maxUnavailable) || self.maxSurge > 0 || self.maxUnavailable > 0",
      message: `${role}.rollingUpdate: maxSurge and maxUnavailable must not both be 0`,
      check: (s) => s["maxSurge"] > 0 || s["maxUnavailable"] > 0,
    }),
  ),
  ...(["gateway", "experts"] as const).map((role) => ({
    path: `spec.${role}`,
    rule: `!has(self.gpuResource) || !self.gpuResource.matches('${KUBERNETES_DOMAIN_RE}')`,
    message: `${role}.gpuResource must be a device plugin's resource, not one of Kubernetes' own (the kubernetes.io domains)`,
    check: (s: Record<string, unknown>) =>
      typeof s["gpuResource"] !== "string" ||
      !new RegExp(KUBERNETES_DOMAIN_RE).test(s["gpuResource"]),
  })),
  {
    path: "spec",
    rule: `!has(self.env) || self.env.all(e, !e.name.startsWith('EM_') && !(e.name in [${RESERVED_ENV.map((n) => `'${n}'`).join(", ")}]))`,
    message: `env names must not start with EM_ nor be one the operator sets (${RESERVED_ENV.join(", ")}): the gateway's keys, the model's download and the pods' identity come from their own fields`,
    check: (s) =>
      (s["env"] ?? []).every(
        (e: { name: string }) => !e.name.startsWith("EM_") && !RESERVED_ENV.includes(e.name),
      ),
  },
  {
    path: "spec.podMetadata",
    rule: `!has(self.labels) || self.labels.all(k, ${labelKeyCel("k")} && !k.startsWith('expertmesh.io/') && !(k in [${RESERVED_LABELS.map((n) => `'${n}'`).join(", ")}]))`,
    message: `podMetadata.labels keys must be label keys (an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.'), not under expertmesh.io/ nor one the operator sets (${RESERVED_LABELS.join(", ")})`,
    check: (s) =>
      Object.keys(s["labels"] ?? {}).every(
        (k) => isLabelKey(k) && !k.startsWith("expertmesh.io/") && !RESERVED_LABELS.includes(k),
      ),
  },
  {
    path: "spec.podMetadata",
    rule: `!has(self.annotations) || self.annotations.all(k, ${labelKeyCel("k")} && !k.startsWith('expertmesh.io/'))`,
    message:
      "podMetadata.annotations keys must be annotation keys (an optional DNS subdomain prefix and '/', then at most 63 letters, digits, '-', '_' or '.'), not under expertmesh.io/",
    check: (s) =>
      Object.keys(s["annotations"] ?? {}).every(
        (k) => isLabelKey(k) && !k.startsWith("expertmesh.io/"),
      ),
  },
  {
    path: "spec",
    rule: "!has(self.env) || self.env.all(e, has(e.value) != has(e.valueFrom) && (!has(e.valueFrom) || has(e.valueFrom.secretKeyRef) != has(e.valueFrom.configMapKeyRef)))",
    message:
      "each env entry takes a value or a valueFrom, not both nor neither; a valueFrom names one of secretKeyRef, configMapKeyRef",
    check: (s) =>
      (s["env"] ?? []).every(
        (e: { value?: string; valueFrom?: Record<string, unknown> }) =>
          (e.value !== undefined) !== (e.valueFrom !== undefined) &&
          (e.valueFrom === undefined ||
            (e.valueFrom["secretKeyRef"] !== undefined) !==
              (e.valueFrom["configMapKeyRef"] !== undefined)),
      ),
  },
  {
    path: "spec.gateway",
    rule: "!has(self.kvCache) || !has(self.kvCache.diskSharedClaim) || !has(self.kvCache.diskSharedStorageClassName)",
    message:
      "gateway.kvCache: give diskSharedClaim (a claim of yours) or diskSharedStorageClassName (the operator makes the claim), not both",
    check: (s) =>
      s["kvCache"]?.diskSharedClaim === undefined ||
      s["kvCache"]?.diskSharedStorageClassName === undefined,
  },
  {
    path: "spec.gateway",
    rule: "!has(self.batch) || !has(self.batch.sharedClaim) || !has(self.batch.sharedStorageClassName)",
    message:
      "gateway.batch: give sharedClaim (a claim of yours) or sharedStorageClassName (the operator makes the claim), not both",
    check: (s) =>
      s["batch"]?.sharedClaim === undefined || s["batch"]?.sharedStorageClassName === undefined,
  },
  {
    path: "spec.model.source",
    rule: "!has(self.huggingFace) || !has(self.huggingFace.sharedStorageClassName) || !has(self.huggingFace.downloaderImage)",
    message:
      "model.source.huggingFace.sharedStorageClassName needs the model's own image to download (expertmesh fetch shares a folder, hf download does not): remove downloaderImage",
    check: (s) =>
      s["huggingFace"]?.sharedStorageClassName === undefined ||
      s["huggingFace"]?.downloaderImage === undefined,
  }, // The API server's own checks of a toleration (ValidateTolerations), which would refuse
  // every Deployment of a model admitted with one that fails them (the admission fuzzer,
  // seed 5817: a toleration with neither key nor operator).
  {
    path: "spec.scheduling",
    rule: "!has(self.tolerations) || self.tolerations.all(t, (has(t.key) && t.key != '') || (has(t.operator) && t.operator == 'Exists'))",
    message:
      "scheduling.tolerations: a toleration without a key matches every taint, so its operator must be Exists",
    check: (s) =>
      (s["tolerations"] ?? []).every(
        (t: { key?: string; operator?: string }) => !!t.key || t.operator === "Exists",
      ),
  },
  {
    path: "spec.scheduling",
    rule: "!has(self.tolerations) || self.tolerations.all(t, !has(t.operator) || t.operator != 'Exists' || !has(t.value) || t.value == '')",
    message: "scheduling.tolerations: a toleration with operator Exists has no value",
    check: (s) =>
      (s["tolerations"] ?? []).every(
        (t: { operator?: string; value?: string }) => t.operator !== "Exists" || !t.value,
      ),
  },
  {
    path: "spec.scheduling",
    rule: "!has(self.tolerations) || self.tolerations.all(t, !has(t.tolerationSeconds) || (has(t.effect) && t.effect == 'NoExecute'))",
    message:
      "scheduling.tolerations: tolerationSeconds (how long a pod stays once a NoExecute taint appears) needs effect NoExecute",
    check: (s) =>
      (s["tolerations"] ?? []).every(
        (t: { tolerationSeconds?: number; effect?: string }) =>
          t.tolerationSeconds === undefined || t.effect === "NoExecute",
      ),
  },
  // The API server's own checks of an affinity and a label selector (ValidateAffinity,
  // ValidateLabelSelector), which would refuse every Deployment of a model admitted with one
  // that fails them.
  {
    path: "spec.scheduling",
    rule: `${NODE_TERMS_CEL((t) => `!has(${t}.matchExpressions) || ${t}.matchExpressions.all(e, ${NODE_REQUIREMENT_CEL("e")})`)}`,
    message:
      "scheduling.affinity.nodeAffinity: a matchExpressions requirement with operator In or NotIn needs values, one with Exists or DoesNotExist has none, one with Gt or Lt has one value, a whole number",
    check: (s) => nodeTerms(s).every((t) => (t.matchExpressions ?? []).every(nodeRequirementOk)),
  },
  {
    path: "spec.scheduling",
    rule: `${NODE_TERMS_CEL((t) => `!has(${t}.matchFields) || ${t}.matchFields.all(e, e.key == 'metadata.name' && e.operator in ['In', 'NotIn'] && has(e.values) && size(e.values) == 1)`)}`,
    message:
      "scheduling.affinity.nodeAffinity: a matchFields requirement is on metadata.name, with operator In or NotIn and one value",
    check: (s) =>
      nodeTerms(s).every((t) =>
        (t.matchFields ?? []).every(
          (e) =>
            e.key === "metadata.name" &&
            (e.operator === "In" || e.operator === "NotIn") &&
            e.values?.length === 1,
        ),
      ),
  },
  {
    path: "spec.scheduling",
    rule: `${POD_TERMS_CEL((t) => `${SELECTOR_CEL(`${t}.labelSelector`)} && ${SELECTOR_CEL(`${t}.namespaceSelector`)}`)} && (!has(self.topologySpreadConstraints) || self.topologySpreadConstraints.all(c, ${SELECTOR_CEL("c.labelSelector")}))`,
    message:
      "scheduling.affinity and scheduling.topologySpreadConstraints label selectors: a matchExpressions requirement with operator In or NotIn needs values, one with Exists or DoesNotExist has none",
    check: (s) =>
      [
        ...podTerms(s).flatMap((t) => [t.labelSelector, t.namespaceSelector]),
        ...(s["topologySpreadConstraints"] ?? []).map(
          (c: { labelSelector?: Selector }) => c.labelSelector,
        ),
      ].every(selectorOk),
  },
  {
    path: "spec.scheduling",
    rule: `${POD_TERMS_CEL((t) => `${MATCH_LABELS_KEYS_CEL(`${t}.labelSelector`)} && ${MATCH_LABELS_KEYS_CEL(`${t}.namespaceSelector`)}`)} && (!has(self.topologySpreadConstraints) || self.topologySpreadConstraints.all(c, ${MATCH_LABELS_KEYS_CEL("c.labelSelector")}))`,
    message:
      "scheduling.affinity and scheduling.topologySpreadConstraints label selectors' matchLabels keys must be label keys: an optional DNS subdomain prefix (at most 253 characters) and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
    check: (s) =>
      [
        ...podTerms(s).flatMap((t) => [t.labelSelector, t.namespaceSelector]),
        ...(s["topologySpreadConstraints"] ?? []).map(
          (c: { labelSelector?: Selector }) => c.labelSelector,
        ),
      ].every((sel) => Object.keys(sel?.matchLabels ?? {}).every(isLabelKey)),
  },
  {
    path: "spec.scheduling",
    rule: POD_TERMS_CEL(
      (t) =>
        `(has(${t}.labelSelector) || ((!has(${t}.matchLabelKeys) || size(${t}.matchLabelKeys) == 0) && (!has(${t}.mismatchLabelKeys) || size(${t}.mismatchLabelKeys) == 0))) && (!has(${t}.matchLabelKeys) || !has(${t}.mismatchLabelKeys) || !${t}.matchLabelKeys.exists(k, k in ${t}.mismatchLabelKeys))`,
    ),
    message:
      "scheduling.affinity: a pod affinity term's matchLabelKeys and mismatchLabelKeys need its labelSelector, and share no key",
    check: (s) =>
      podTerms(s).every(
        (t) =>
          (t.labelSelector !== undefined ||
            (t.matchLabelKeys?.length ?? 0) + (t.mismatchLabelKeys?.length ?? 0) === 0) &&
          !(t.matchLabelKeys ?? []).some((k) => t.mismatchLabelKeys?.includes(k)),
      ),
  },
  // A NetworkPolicy's peers as ValidateNetworkPolicyPeer checks them (the API server would
  // refuse the model's NetworkPolicies, and the model would serve without them).
  {
    path: "spec.networkPolicy",
    rule: PEERS_CEL(
      (p) => `!has(${p}.ipBlock) || (!has(${p}.podSelector) && !has(${p}.namespaceSelector))`,
    ),
    message:
      "networkPolicy: a peer with an ipBlock has nothing else (podSelector and namespaceSelector go in a peer of their own)",
    check: (s) => peersOf(s).every((p) => !p.ipBlock || (!p.podSelector && !p.namespaceSelector)),
  },
  {
    path: "spec.networkPolicy",
    rule: PEERS_CEL(
      (p) => `${SELECTOR_CEL(`${p}.podSelector`)} && ${SELECTOR_CEL(`${p}.namespaceSelector`)}`,
    ),
    message:
      "networkPolicy: a peer's label selector requirement with operator In or NotIn needs values, one with Exists or DoesNotExist has none",
    check: (s) =>
      peersOf(s).every((p) => selectorOk(p.podSelector) && selectorOk(p.namespaceSelector)),
  },
];

/** A NetworkPolicy peer (spec.networkPolicy). */
interface Peer {
  readonly podSelector?: Selector;
  readonly namespaceSelector?: Selector;
  readonly ipBlock?: object;
}
/** Every peer of spec.networkPolicy `n`: from, to NATS, to the extra rules' destinations. */
function peersOf(n: {
  gatewayFrom?: Peer[];
  metricsFrom?: Peer[];
  egress?: { natsTo?: Peer[]; extraRules?: { to?: Peer[] }[] };
}): Peer[] {
  return [
    ...(n.gatewayFrom ?? []),
    ...(n.metricsFrom ?? []),
    ...(n.egress?.natsTo ?? []),
    ...(n.egress?.extraRules ?? []).flatMap((r) => r.to ?? []),
  ];
}
/** CEL: `peer` holds for every peer of self (spec.networkPolicy). */
function PEERS_CEL(peer: (p: string) => string): string {
  const all = (list: string) => `(!has(${list}) || ${list}.all(p, ${peer("p")}))`;
  return `${all("self.gatewayFrom")} && ${all("self.metricsFrom")} && (!has(self.egress) || (${all("self.egress.natsTo")} && (!has(self.egress.extraRules) || self.egress.extraRules.all(r, ${all("r.to")}))))`;
}

/** Whether spec.gateway.kvCache `k` asks for a disk tier the gateways share. */
function diskShared(k: Record<string, unknown> | undefined): boolean {
  return k?.["diskSharedClaim"] !== undefined || k?.["diskSharedStorageClassName"] !== undefined;
}

/** The CRD's x-kubernetes-validations for the object at `path`. */
export function validationsAt(path: string): { rule: string; message: string }[] {
  return CROSS_FIELD_RULES.filter((r) => r.path === path).map(({ rule, message }) => ({
    rule,
    message,
  }));
}

/** Messages of every rule the (defaulted) resource breaks; objects absent are skipped. */
export function crossFieldErrors(
  resource: Record<string, any>,
): { path: string; message: string }[] {
  const errors: { path: string; message: string }[] = [];
  for (const r of CROSS_FIELD_RULES) {
    let self: any = resource;
    for (const key of r.path.split(".")) self = self?.[key];
    if (self === undefined || self === null) continue;
    if (!r.check(self)) errors.push({ path: r.path, message: r.message });
  }
  return errors;
}
