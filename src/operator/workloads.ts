// The desired Kubernetes objects of one DeepSeekModel: a pure function of the model, its
// placement plan and the operator's settings. Only the reconciler does I/O.
import { createHash } from "node:crypto";
import type {
  KubernetesObject,
  V1ConfigMap,
  V1Deployment,
  V1EnvVar,
  V1LabelSelector,
  V1NetworkPolicy,
  V1NetworkPolicyIngressRule,
  V1PersistentVolumeClaim,
  V1PodDisruptionBudget,
  V1PodSpec,
  V1Service,
  V1Volume,
  V1VolumeMount,
} from "@kubernetes/client-node";
import {
  architectureOf,
  batchArgs,
  chatTemplateArgs,
  type GatewayRole,
  gatewayArgs,
  modelArgs,
  prefixCacheDiskArgs,
  servedModelName,
} from "../api/manifest.ts";
import { gatewayWeightBytes, POD_MEMORY_OVERHEAD, shardExpertBytes } from "../api/memory.ts";
import { quantityValue } from "../api/quantity.ts";
import { DEFAULT_GPU_RESOURCE, type DeepSeekModel } from "../api/schema.ts";
import type { PlacementPlan } from "../moe/placement.ts";
import { serializePlan } from "../moe/plan-json.ts";
import { egressRules, type PolicyRole } from "./egress.ts";
import {
  ANNOTATION_CHAT_TEMPLATE,
  ANNOTATION_ENV_SOURCES,
  ANNOTATION_PLAN_SHAPE,
  type Component,
  LABEL_COMPONENT,
  LABEL_MODEL,
  labelsFor,
  MANAGED_BY,
  names,
} from "./labels.ts";

/** The Prometheus Operator's PodMonitor (monitoring.coreos.com/v1), the fields set here. */
export interface PodMonitor {
  apiVersion: "monitoring.coreos.com/v1";
  kind: "PodMonitor";
  metadata: ReturnType<typeof meta>;
  spec: {
    selector: { matchLabels: Record<string, string> };
    podTargetLabels: string[];
    podMetricsEndpoints: {
      port: string;
      path: string;
      honorLabels: boolean;
      interval?: string;
    }[];
  };
}

export type DesiredObject =
  | V1ConfigMap
  | V1Deployment
  | V1Service
  | V1PodDisruptionBudget
  | V1NetworkPolicy
  | V1PersistentVolumeClaim
  | PodMonitor;

/** Seconds a gateway keeps serving after SIGTERM, not ready (`gateway --shutdown-delay`). */
export const GATEWAY_SHUTDOWN_DELAY_S = 5;

/** Where things are inside the pods. */
export const PATHS = {
  plan: "/etc/expertmesh/plan.json",
  planDir: "/etc/expertmesh",
  /** spec.gateway.chatTemplate, a key of the plan ConfigMap. */
  chatTemplate: "/etc/expertmesh/chat_template.jinja",
  models: "/models",
  /** The gateway's prefix cache disk tier (spec.gateway.kvCache.diskBytes), an emptyDir. */
  prefixCache: "/var/cache/expertmesh/prefix",
  /** spec.gateway.batch's files and batches: a shared claim, or an emptyDir. */
  batch: "/var/lib/expertmesh/batch",
  /** spec.nats's Secrets: the credentials, the CA, the client certificate. */
  natsCreds: "/var/run/expertmesh/nats",
  natsUser: "/var/run/expertmesh/nats-auth/user",
  natsToken: "/var/run/expertmesh/nats-auth/token",
  natsNkey: "/var/run/expertmesh/nats-auth/nkey",
  natsTlsCa: "/var/run/expertmesh/nats-tls/ca",
  natsTlsClient: "/var/run/expertmesh/nats-tls/client",
  /** spec.gateway.apiKeySecret's key, as the file --api-keys-file reads. */
  gatewayApiKeys: "/var/run/expertmesh/gateway-api-keys",
  /** spec.gateway.tls's Secrets: the gateway's serving certificate and key, the client CA. */
  gatewayTls: "/var/run/expertmesh/gateway-tls",
  gatewayClientCa: "/var/run/expertmesh/gateway-client-ca",
};

/**
 * How a gateway serves TLS (spec.gateway.tls): the volumes of its Secrets, their mounts, the
 * flags, and where the kubelet's probes go: the API's port in TLS (the kubelet does not
 * verify), or with a client CA the metrics port in plain HTTP, since the kubelet presents no
 * client certificate and the API's port refuses a client without one.
 */
function gatewayTlsWiring(model: DeepSeekModel): {
  volumes: V1Volume[];
  mounts: V1VolumeMount[];
  args: string[];
  probe: { port: string; scheme?: string };
} {
  const { tls } = model.spec.gateway;
  if (!tls) return { volumes: [], mounts: [], args: [], probe: { port: "http" } };
  const volumes: V1Volume[] = [];
  const mounts: V1VolumeMount[] = [];
  const mount = (name: string, secretName: string, path: string) => {
    volumes.push({ name, secret: { secretName } });
    mounts.push({ name, mountPath: path, readOnly: true });
  };
  mount("gateway-tls", tls.secretName, PATHS.gatewayTls);
  const args = [`--tls-cert=${PATHS.gatewayTls}/tls.crt`, `--tls-key=${PATHS.gatewayTls}/tls.key`];
  const ca = tls.clientCASecret;
  if (!ca) return { volumes, mounts, args, probe: { port: "http", scheme: "HTTPS" } };
  mount("gateway-client-ca", ca.name, PATHS.gatewayClientCa);
  args.push(`--tls-client-ca=${PATHS.gatewayClientCa}/${ca.key}`);
  return { volumes, mounts, args, probe: { port: "metrics" } };
}

/**
 * How a gateway takes its API keys (spec.gateway.apiKeySecret): the Secret's key mounted as a
 * file, never in the args or the environment, which the gateway reads again when it changes
 * (the kubelet updates a mounted Secret in place; ADR 0043), so keys rotate without a restart.
 */
function gatewayApiKeysWiring(model: DeepSeekModel): {
  volumes: V1Volume[];
  mounts: V1VolumeMount[];
  args: string[];
} {
  const ref = model.spec.gateway.apiKeySecret;
  if (!ref) return { volumes: [], mounts: [], args: [] };
  return {
    volumes: [
      {
        name: "gateway-api-keys",
        secret: { secretName: ref.name, items: [{ key: ref.key, path: "keys" }] },
      },
    ],
    mounts: [{ name: "gateway-api-keys", mountPath: PATHS.gatewayApiKeys, readOnly: true }],
    args: [`--api-keys-file=${PATHS.gatewayApiKeys}/keys`],
  };
}

/**
 * How a model's pods reach NATS: the volumes of spec.nats's Secrets, their mounts, and the
 * flags. With spec.nats.tls, TLS is required: a nats:// URL is given to the pods as tls://
 * (the same host and port; nats.js would otherwise go on in plain text to a server without
 * TLS), as the operator's own connection requires it too.
 */
function natsWiring(model: DeepSeekModel): {
  volumes: V1Volume[];
  mounts: V1VolumeMount[];
  args: string[];
} {
  const {
    url,
    credentialsSecret: creds,
    userSecret,
    tokenSecret,
    nkeySecret,
    tls,
  } = model.spec.nats;
  const volumes: V1Volume[] = [];
  const mounts: V1VolumeMount[] = [];
  const args = [`--nats=${tls ? url.replace(/^nats:\/\//i, "tls://") : url}`];
  const mount = (name: string, secretName: string, path: string) => {
    volumes.push({ name, secret: { secretName } });
    mounts.push({ name, mountPath: path, readOnly: true });
  };
  if (creds) {
    mount("nats-creds", creds.name, PATHS.natsCreds);
    args.push(`--nats-creds=${PATHS.natsCreds}/${creds.key}`);
  }
  if (userSecret) {
    mount("nats-user", userSecret.name, PATHS.natsUser);
    args.push(
      `--nats-user-file=${PATHS.natsUser}/username`,
      `--nats-password-file=${PATHS.natsUser}/password`,
    );
  }
  if (tokenSecret) {
    mount("nats-token", tokenSecret.name, PATHS.natsToken);
    args.push(`--nats-token-file=${PATHS.natsToken}/${tokenSecret.key}`);
  }
  if (nkeySecret) {
    mount("nats-nkey", nkeySecret.name, PATHS.natsNkey);
    args.push(`--nats-nkey=${PATHS.natsNkey}/${nkeySecret.key}`);
  }
  if (tls?.caSecret) {
    mount("nats-tls-ca", tls.caSecret.name, PATHS.natsTlsCa);
    args.push(`--nats-tls-ca=${PATHS.natsTlsCa}/${tls.caSecret.key}`);
  }
  if (tls?.clientSecret) {
    mount("nats-tls-client", tls.clientSecret.name, PATHS.natsTlsClient);
    args.push(
      `--nats-tls-cert=${PATHS.natsTlsClient}/tls.crt`,
      `--nats-tls-key=${PATHS.natsTlsClient}/tls.key`,
    );
  }
  return { volumes, mounts, args };
}

/** The first 16 hex digits of a text's SHA-256 (an annotation that changes with the text). */
const sha256Short = (text: string) => createHash("sha256").update(text).digest("hex").slice(0, 16);

/** Replica counts chosen for this reconcile (the autoscaler's, or the spec's). */
export interface Replicas {
  gateway: number | undefined;
  /** Prefill gateways (spec.gateway.disaggregation; absent without). */
  prefill?: number | undefined;
  /** Per shard; undefined leaves replicas to an external autoscaler. */
  shards: (number | undefined)[];
}

/** The replicas the spec asks for: clamped to min/max; none when an HPA/KEDA owns them. */
export function specReplicas(model: DeepSeekModel, plan: PlacementPlan): Replicas {
  const { autoscaling, gateway, experts } = model.spec;
  const external = autoscaling.enabled && autoscaling.mode === "external";
  const clamp = (r: { replicas: number; minReplicas: number; maxReplicas: number }) =>
    external ? undefined : Math.min(Math.max(r.replicas, r.minReplicas), r.maxReplicas);
  return {
    gateway: clamp(gateway),
    ...(gateway.disaggregation ? { prefill: clamp(gateway.disaggregation) } : {}),
    shards: Array.from({ length: plan.numShards }, () =>
      external ? undefined : experts.replicas.min,
    ),
  };
}

function ownerReference(model: DeepSeekModel) {
  return {
    apiVersion: model.apiVersion,
    kind: model.kind,
    name: model.metadata.name,
    uid: model.metadata.uid ?? "",
    controller: true,
    blockOwnerDeletion: true,
  };
}

function meta(model: DeepSeekModel, name: string, component: Component, shard?: number) {
  return {
    name,
    namespace: model.metadata.namespace,
    labels: labelsFor(model, component, shard),
    ownerReferences: [ownerReference(model)],
  };
}

/** spec.env, as every container's variables (beside the operator's own, which it may not name). */
const userEnv = (model: DeepSeekModel): V1EnvVar[] =>
  (model.spec.env ?? []).map(({ name, value, valueFrom }) =>
    valueFrom ? { name, valueFrom } : { name, value: value ?? "" },
  );

/** The model's weights volume and the folder of the checkpoint inside the pods. */
function modelVolume(model: DeepSeekModel): {
  volume: V1Volume;
  modelDir: string;
  initContainers: V1PodSpec["initContainers"];
} {
  const { pvc, huggingFace } = model.spec.model.source;
  if (pvc) {
    return {
      volume: {
        name: "model",
        persistentVolumeClaim: { claimName: pvc.claimName, readOnly: true },
      },
      modelDir: `${PATHS.models}/${pvc.path}`.replace(/\/+$/, ""),
      initContainers: undefined,
    };
  }
  const hf = huggingFace!;
  // Every pod on one claim (sharedStorageClassName): downloaded once (fetch's lease), in a
  // folder of the revision's own, so that pods of another revision (a roll's, blue/green
  // copies of the previous weights) never fetch into the folder others read.
  const shared = sharedClaimOf(model, "model");
  const dir = shared
    ? `${PATHS.models}/${hf.repo.replace("/", "--")}@${hf.revision.replace(/[^A-Za-z0-9._-]/g, "_")}`
    : `${PATHS.models}/${hf.repo.replace("/", "--")}`;
  // The model's own image and `expertmesh fetch`, unless the manifest names a Python image
  // for `hf download` (models created before 2026-12-05 have python:3.12-slim, then the
  // default: their pods stay as they are).
  const run = hf.downloaderImage
    ? {
        image: hf.downloaderImage,
        command: [
          "sh",
          "-c",
          [
            "set -eu",
            "python -m venv /tmp/hf",
            '/tmp/hf/bin/pip install --quiet --no-cache-dir "huggingface_hub>=1.0"',
            '/tmp/hf/bin/hf download "$HF_REPO" --revision "$HF_REVISION" --local-dir "$MODEL_DIR"',
          ].join("\n"),
        ],
      }
    : {
        image: model.spec.image,
        imagePullPolicy: model.spec.imagePullPolicy,
        args: ["fetch", hf.repo, `--revision=${hf.revision}`, `--dir=${dir}`],
      };
  return {
    volume: shared
      ? { name: "model", persistentVolumeClaim: { claimName: shared.claimName } }
      : { name: "model", emptyDir: { sizeLimit: hf.cacheSize } },
    modelDir: dir,
    initContainers: [
      {
        name: "download-weights",
        ...run,
        env: [
          ...userEnv(model),
          { name: "HF_REPO", value: hf.repo },
          { name: "HF_REVISION", value: hf.revision },
          { name: "MODEL_DIR", value: dir },
          { name: "HF_HOME", value: "/tmp/hf-home" },
          ...(hf.tokenSecret
            ? [
                {
                  name: "HF_TOKEN",
                  valueFrom: {
                    secretKeyRef: { name: hf.tokenSecret.name, key: hf.tokenSecret.key },
                  },
                },
              ]
            : []),
        ],
        volumeMounts: [{ name: "model", mountPath: PATHS.models }],
        // The restricted Pod Security Standard's container fields, as the main containers'.
        securityContext: {
          allowPrivilegeEscalation: false,
          runAsNonRoot: true,
          runAsUser: 10001,
          capabilities: { drop: ["ALL"] },
        },
      },
    ],
  };
}

/**
 * Pod spec parts every role shares: scheduling, volumes, security, pull secrets. `role`'s
 * pods are those a topology spread constraint without a labelSelector counts.
 */
function podSpec(
  model: DeepSeekModel,
  role: "gateway" | "prefill" | "shard",
  containers: V1PodSpec["containers"],
  extraVolumes: V1Volume[] = [],
): V1PodSpec {
  const { scheduling, imagePullSecrets } = model.spec;
  const weights = modelVolume(model);
  const volumes: V1Volume[] = [
    weights.volume,
    { name: "plan", configMap: { name: names.plan(model.metadata.name) } },
    ...natsWiring(model).volumes,
    ...extraVolumes,
  ];
  return {
    ...(weights.initContainers ? { initContainers: weights.initContainers } : {}),
    containers,
    volumes,
    securityContext: {
      runAsNonRoot: true,
      runAsUser: 10001,
      runAsGroup: 10001,
      fsGroup: 10001,
      // The shared claims the pods write (a Hub download, the prefix cache's disk tier, the
      // files folder) hold thousands of files: their group is set when a volume's top folder
      // is not the pods' yet, not on every pod's start (the kubelet's default walks them all).
      fsGroupChangePolicy: "OnRootMismatch",
      seccompProfile: { type: "RuntimeDefault" },
    },
    terminationGracePeriodSeconds: 60,
    ...(scheduling.nodeSelector ? { nodeSelector: scheduling.nodeSelector } : {}),
    ...(scheduling.tolerations ? { tolerations: scheduling.tolerations } : {}),
    ...(scheduling.affinity ? { affinity: scheduling.affinity as V1PodSpec["affinity"] } : {}),
    ...(scheduling.priorityClassName ? { priorityClassName: scheduling.priorityClassName } : {}),
    ...(scheduling.runtimeClassName ? { runtimeClassName: scheduling.runtimeClassName } : {}),
    ...(scheduling.topologySpreadConstraints
      ? {
          topologySpreadConstraints: scheduling.topologySpreadConstraints.map((c) => ({
            ...c,
            labelSelector: (c.labelSelector as V1LabelSelector | undefined) ?? {
              matchLabels: { [LABEL_MODEL]: model.metadata.name, [LABEL_COMPONENT]: role },
            },
          })),
        }
      : {}),
    ...(imagePullSecrets ? { imagePullSecrets } : {}),
  };
}

/** Room in the prefix cache's emptyDir past its budget: temporary files of pending writes. */
const PREFIX_DISK_HEADROOM = 128 * 2 ** 20;

/** The size of the gateway's prefix cache disk tier's volume (0: none). */
function prefixDiskBytes(model: DeepSeekModel): number {
  const d = model.spec.gateway.kvCache.diskBytes;
  return d > 0 ? d + PREFIX_DISK_HEADROOM : 0;
}

/** The emptyDir size of the gateway's prefix cache disk tier (0: none, or a shared claim). */
export function prefixDiskVolumeBytes(model: DeepSeekModel): number {
  return sharedClaimOf(model, "prefix-cache") ? 0 : prefixDiskBytes(model);
}

/**
 * The size of a volume of files and batches: storageBytes, which the gateway keeps the
 * folder under (--files-max-total), and room for what crosses it before the gateway sees it
 * full (answers being written, a count 2 s old), so that the kubelet never evicts the pod for
 * it (an emptyDir) and no write finds the volume full (a claim).
 */
function batchBytes(b: { storageBytes: number }): number {
  return b.storageBytes + Math.ceil(b.storageBytes / 20) + 64 * 2 ** 20;
}

/** The emptyDir size of a gateway's files and batches (0: none, a shared claim, or prefill). */
export function batchVolumeBytes(model: DeepSeekModel, role: GatewayRole): number {
  const b = model.spec.gateway.batch;
  if (role !== "gateway" || b === undefined || sharedClaimOf(model, "batch")) return 0;
  return batchBytes(b);
}

/**
 * A ReadWriteMany claim that every (serving and prefill) gateway mounts instead of an
 * emptyDir (the disk tier's, the batches'), or every pod (the weights' download).
 */
export interface SharedClaim {
  /** The volume's name in the pods (every gateway's; the weights': every pod's). */
  readonly volume: "prefix-cache" | "batch" | "model";
  readonly claimName: string;
  /** The spec field that asks for it, for messages. */
  readonly field: string;
  /** Set when the operator makes the claim (of a StorageClass), owned by the model. */
  readonly made?: { readonly storageClassName: string; readonly size: string };
}

/**
 * The model's shared claims: the Hub download's (model.source.huggingFace.
 * sharedStorageClassName), the prefix cache's disk tier's (kvCache.diskSharedClaim, or
 * diskSharedStorageClassName; only with diskBytes) and the files and batches' (batch.
 * sharedClaim, or sharedStorageClassName). A claim the operator makes is of the volume's size.
 */
export function sharedClaims(model: DeepSeekModel): SharedClaim[] {
  const name = model.metadata.name;
  const { kvCache, batch } = model.spec.gateway;
  const out: SharedClaim[] = [];
  const hf = model.spec.model.source.huggingFace;
  if (hf?.sharedStorageClassName !== undefined)
    out.push({
      volume: "model",
      claimName: names.weightsClaim(name),
      field: "spec.model.source.huggingFace.sharedStorageClassName",
      made: {
        storageClassName: hf.sharedStorageClassName,
        size: hf.cacheSize,
      },
    });
  if (kvCache.diskBytes > 0) {
    if (kvCache.diskSharedClaim !== undefined)
      out.push({
        volume: "prefix-cache",
        claimName: kvCache.diskSharedClaim,
        field: "spec.gateway.kvCache.diskSharedClaim",
      });
    else if (kvCache.diskSharedStorageClassName !== undefined)
      out.push({
        volume: "prefix-cache",
        claimName: names.prefixCacheClaim(name),
        field: "spec.gateway.kvCache.diskSharedStorageClassName",
        made: {
          storageClassName: kvCache.diskSharedStorageClassName,
          size: String(prefixDiskBytes(model)),
        },
      });
  }
  if (batch?.sharedClaim !== undefined)
    out.push({
      volume: "batch",
      claimName: batch.sharedClaim,
      field: "spec.gateway.batch.sharedClaim",
    });
  else if (batch?.sharedStorageClassName !== undefined)
    out.push({
      volume: "batch",
      claimName: names.batchClaim(name),
      field: "spec.gateway.batch.sharedStorageClassName",
      made: { storageClassName: batch.sharedStorageClassName, size: String(batchBytes(batch)) },
    });
  return out;
}

/**
 * Claim `wanted` at no less than the size `before` has (a claim never shrinks: the API
 * server refuses it), and in the very words of that size when it is not larger (so that the
 * apply changes nothing).
 */
export function claimNoSmaller(
  wanted: V1PersistentVolumeClaim,
  before: KubernetesObject,
): V1PersistentVolumeClaim {
  const had = (before as V1PersistentVolumeClaim).spec?.resources?.requests?.["storage"];
  const want = wanted.spec?.resources?.requests?.["storage"];
  if (had === undefined || want === undefined) return wanted;
  if ((quantityValue(want) ?? 0) > (quantityValue(had) ?? Number.POSITIVE_INFINITY)) return wanted;
  return {
    ...wanted,
    spec: { ...wanted.spec, resources: { ...wanted.spec?.resources, requests: { storage: had } } },
  };
}

/** The shared claim of gateway volume `volume`, if the model asks for one. */
function sharedClaimOf(
  model: DeepSeekModel,
  volume: SharedClaim["volume"],
): SharedClaim | undefined {
  return sharedClaims(model).find((c) => c.volume === volume);
}

/**
 * The claim the operator makes for `c` (ReadWriteMany, of c.made's class and size). Its
 * size only grows: the reconciler applies the larger of this and the claim's own.
 */
export function sharedClaimObject(
  model: DeepSeekModel,
  c: SharedClaim & { made: NonNullable<SharedClaim["made"]> },
): V1PersistentVolumeClaim {
  return {
    apiVersion: "v1",
    kind: "PersistentVolumeClaim",
    metadata: meta(model, c.claimName, "storage"),
    spec: {
      accessModes: ["ReadWriteMany"],
      storageClassName: c.made.storageClassName,
      resources: { requests: { storage: c.made.size } },
    },
  };
}

/**
 * The gateway's resources: the manifest's, with a memory request when the manifest requests
 * none, so the scheduler does not place a gateway where it cannot fit: its KV cache (which
 * lives in host memory), plus its weights and POD_MEMORY_OVERHEAD when the preset says how
 * many bytes they take (gatewayWeightBytes); and with the prefix cache's disk tier, an
 * ephemeral-storage request of its emptyDir when the manifest requests none (else the
 * kubelet could evict the pod from a node whose disk is short).
 */
export function gatewayResources(model: DeepSeekModel, role: GatewayRole = "gateway") {
  const r = model.spec.gateway.resources;
  const requests: Record<string, string | number> = { ...(r?.requests ?? {}) };
  if (requests["memory"] === undefined) {
    const weights = gatewayWeightBytes(model);
    requests["memory"] = withinLimit(
      model.spec.gateway.kvCache.bytes + (weights === null ? 0 : weights + POD_MEMORY_OVERHEAD),
      r?.limits?.["memory"],
    );
  }
  const disk = prefixDiskVolumeBytes(model) + batchVolumeBytes(model, role);
  if (disk > 0 && requests["ephemeral-storage"] === undefined)
    requests["ephemeral-storage"] = withinLimit(disk, r?.limits?.["ephemeral-storage"]);
  return { ...(r ?? {}), requests };
}

/**
 * A request the operator computes (`bytes`), never above the manifest's limit: the API
 * server refuses a container whose request exceeds its limit (a limit under the weights
 * alone is MemoryLimitTooLow, before anything is applied).
 */
function withinLimit(bytes: number, limit: string | number | undefined): string {
  const l = limit === undefined ? null : quantityValue(limit);
  return l !== null && l < bytes ? String(limit) : String(bytes);
}

/**
 * A shard's resources: the manifest's, with a memory request of its experts' bytes plus
 * POD_MEMORY_OVERHEAD when the manifest requests none (the weights live in host memory,
 * GPU or not: the device copies are made from them), so the scheduler does not place a
 * shard where they cannot fit.
 */
export function shardResources(model: DeepSeekModel, plan: PlacementPlan, k: number) {
  const r = model.spec.experts.resources;
  const bytes = shardExpertBytes(model, plan, k);
  if (r?.requests?.["memory"] !== undefined || bytes === null) return r;
  return {
    ...(r ?? {}),
    requests: {
      ...(r?.requests ?? {}),
      memory: withinLimit(bytes + POD_MEMORY_OVERHEAD, r?.limits?.["memory"]),
    },
  };
}

function containerBase(
  model: DeepSeekModel,
  role: "gateway" | "shard",
  args: string[],
  gpu: { count: number; resource: string },
  resources?: {
    requests?: Record<string, string | number>;
    limits?: Record<string, string | number>;
  },
) {
  const weights = modelVolume(model);
  const nats = natsWiring(model);
  const gpus = gpu.count;
  // spec.<role>.gpuResource: nvidia.com/gpu, or a MIG profile or shared GPU's resource.
  const gpuRequest = gpus > 0 ? { [gpu.resource]: gpus } : {};
  const limits = { ...(resources?.limits ?? {}), ...gpuRequest };
  const requests = { ...(resources?.requests ?? {}), ...gpuRequest };
  const str = (r: Record<string, string | number>) =>
    Object.fromEntries(Object.entries(r).map(([k, v]) => [k, String(v)]));
  return {
    name: role,
    image: model.spec.image,
    imagePullPolicy: model.spec.imagePullPolicy,
    args: [
      role,
      `--model=${weights.modelDir}`,
      `--plan=${PATHS.plan}`,
      ...nats.args,
      `--namespace=${model.metadata.namespace}`,
      `--model-name=${model.metadata.name}`,
      ...(gpus > 0 ? ["--device=cuda:0"] : ["--device=cpu"]),
      ...modelArgs(model),
      ...args,
    ],
    env: [
      { name: "POD_NAME", valueFrom: { fieldRef: { fieldPath: "metadata.name" } } },
      { name: "POD_NAMESPACE", valueFrom: { fieldRef: { fieldPath: "metadata.namespace" } } },
      ...userEnv(model),
    ],
    resources: {
      ...(Object.keys(limits).length ? { limits: str(limits) } : {}),
      ...(Object.keys(requests).length ? { requests: str(requests) } : {}),
    },
    volumeMounts: [
      { name: "model", mountPath: PATHS.models, readOnly: !!model.spec.model.source.pvc },
      { name: "plan", mountPath: PATHS.planDir, readOnly: true },
      ...nats.mounts,
    ],
    securityContext: {
      allowPrivilegeEscalation: false,
      readOnlyRootFilesystem: true,
      capabilities: { drop: ["ALL"] },
    },
  };
}

function planConfigMap(model: DeepSeekModel, plan: PlacementPlan): V1ConfigMap {
  const arch = architectureOf(model);
  return {
    apiVersion: "v1",
    kind: "ConfigMap",
    metadata: meta(model, names.plan(model.metadata.name), "plan"),
    data: {
      "plan.json": serializePlan(plan),
      "model.json": `${JSON.stringify({ servedModelName: servedModelName(model), preset: model.spec.model.preset ?? null, architecture: arch, dtype: model.spec.model.dtype }, null, 2)}\n`,
      ...(model.spec.gateway.chatTemplate !== undefined
        ? { "chat_template.jinja": model.spec.gateway.chatTemplate }
        : {}),
    },
  };
}

function deployment(
  model: DeepSeekModel,
  name: string,
  component: "gateway" | "prefill" | "shard",
  replicas: number | undefined,
  plan: PlacementPlan,
  spec: V1PodSpec,
  shard?: number,
  annotations: Record<string, string> = {},
): V1Deployment {
  const selector = labelsFor(model, component, shard);
  // Absent under a CRD older than the field (its defaults come from the API server).
  const strategy: Partial<DeepSeekModel["spec"]["experts"]["rollingUpdate"]> =
    (component === "shard" ? model.spec.experts.rollingUpdate : model.spec.gateway.rollingUpdate) ??
    {};
  const { maxSurge = 1, maxUnavailable = 0, progressDeadlineSeconds = 1800 } = strategy;
  return {
    apiVersion: "apps/v1",
    kind: "Deployment",
    metadata: meta(model, name, component, shard),
    spec: {
      ...(replicas === undefined ? {} : { replicas }),
      selector: { matchLabels: selector },
      strategy: { type: "RollingUpdate", rollingUpdate: { maxUnavailable, maxSurge } },
      progressDeadlineSeconds,
      template: {
        metadata: {
          // spec.podMetadata's may not name the operator's keys (rules.ts); ours win anyway.
          labels: { ...model.spec.podMetadata?.labels, ...selector },
          annotations: {
            ...model.spec.podMetadata?.annotations,
            [ANNOTATION_PLAN_SHAPE]: planShape(plan),
            ...annotations,
          },
        },
        spec,
      },
    },
  };
}

function pdb(
  model: DeepSeekModel,
  name: string,
  component: "gateway" | "prefill" | "shard",
  shard?: number,
): V1PodDisruptionBudget {
  return {
    apiVersion: "policy/v1",
    kind: "PodDisruptionBudget",
    metadata: meta(model, name, component, shard),
    spec: { maxUnavailable: 1, selector: { matchLabels: labelsFor(model, component, shard) } },
  };
}

/**
 * The pod of a gateway: one that serves clients (behind the Service), or a prefill gateway
 * (spec.gateway.disaggregation; the same container but for its mode).
 */
function gatewayPod(model: DeepSeekModel, role: GatewayRole): V1PodSpec {
  const { gateway } = model.spec;
  const tls = gatewayTlsWiring(model);
  const apiKeys = gatewayApiKeysWiring(model);
  const gw = containerBase(
    model,
    "gateway",
    [
      `--http-port=${gateway.ports.http}`,
      `--grpc-port=${gateway.ports.grpc}`,
      `--metrics-port=${gateway.ports.metrics}`,
      // Still serving for 5 s after SIGTERM, not ready: the Service's endpoints drop the pod
      // before its port closes (then 45 s for requests in flight, within the 60 s grace).
      `--shutdown-delay=${GATEWAY_SHUTDOWN_DELAY_S}`,
      ...gatewayArgs(model, role),
      ...prefixCacheDiskArgs(model, PATHS.prefixCache),
      // (prefill gateways are behind no Service: no client reaches their routes)
      ...(role === "gateway" ? batchArgs(model, PATHS.batch) : []),
      ...chatTemplateArgs(model, PATHS.chatTemplate),
      ...tls.args,
      ...apiKeys.args,
    ],
    // (A CRD older than the operator has no default for gpuResource.)
    { count: gateway.gpus, resource: gateway.gpuResource ?? DEFAULT_GPU_RESOURCE },
    gatewayResources(model, role),
  );
  // The disk tier's files, their temporary copies and fingerprint.json: the budget, and
  // room for the writes under way (64 MiB at most) before the kubelet evicts the pod.
  // With a shared claim, every gateway mounts that volume instead (ReadWriteMany).
  const diskBytes = prefixDiskVolumeBytes(model);
  const sharedDisk = sharedClaimOf(model, "prefix-cache");
  const prefixVolumes: V1Volume[] = sharedDisk
    ? [{ name: "prefix-cache", persistentVolumeClaim: { claimName: sharedDisk.claimName } }]
    : diskBytes > 0
      ? [{ name: "prefix-cache", emptyDir: { sizeLimit: String(diskBytes) } }]
      : [];
  const sharedBatch = sharedClaimOf(model, "batch");
  const batchVolumes: V1Volume[] =
    role !== "gateway" || gateway.batch === undefined
      ? []
      : sharedBatch
        ? [{ name: "batch", persistentVolumeClaim: { claimName: sharedBatch.claimName } }]
        : [{ name: "batch", emptyDir: { sizeLimit: String(batchVolumeBytes(model, role)) } }];
  const gwContainer = {
    ...gw,
    volumeMounts: [
      ...gw.volumeMounts,
      ...(prefixVolumes.length > 0 ? [{ name: "prefix-cache", mountPath: PATHS.prefixCache }] : []),
      ...(batchVolumes.length > 0 ? [{ name: "batch", mountPath: PATHS.batch }] : []),
      ...tls.mounts,
      ...apiKeys.mounts,
    ],
    ports: [
      { name: "http", containerPort: gateway.ports.http },
      { name: "grpc", containerPort: gateway.ports.grpc },
      { name: "metrics", containerPort: gateway.ports.metrics },
    ],
    readinessProbe: { httpGet: { path: "/ready", ...tls.probe }, periodSeconds: 5 },
    livenessProbe: {
      httpGet: { path: "/health", ...tls.probe },
      periodSeconds: 10,
      failureThreshold: 6,
    },
  };
  return podSpec(
    model,
    role,
    [gwContainer],
    [...prefixVolumes, ...batchVolumes, ...tls.volumes, ...apiKeys.volumes],
  );
}

/**
 * Every object the model needs, in apply order: the plan ConfigMap first (pods mount it),
 * then shards (a new plan reaches shards before gateways), then the gateway and Service.
 */
export function desiredObjects(
  model: DeepSeekModel,
  plan: PlacementPlan,
  replicas: Replicas,
  /** envSourcesHash's: the values spec.env reads from Secrets and ConfigMaps (none: absent). */
  envSources?: string,
): DesiredObject[] {
  const name = model.metadata.name;
  const { gateway, experts } = model.spec;
  const objects: DesiredObject[] = [planConfigMap(model, plan)];
  // The claims the operator makes, before the pods that mount them.
  for (const c of sharedClaims(model))
    if (c.made) objects.push(sharedClaimObject(model, { ...c, made: c.made }));
  // Every container reads spec.env: a changed value rolls every role.
  const envHash: Record<string, string> =
    envSources === undefined ? {} : { [ANNOTATION_ENV_SOURCES]: envSources };
  for (let k = 0; k < plan.numShards; k++) {
    const container = containerBase(
      model,
      "shard",
      [`--shard=${k}`, "--metrics-port=9090"],
      { count: experts.gpusPerShard, resource: experts.gpuResource ?? DEFAULT_GPU_RESOURCE },
      shardResources(model, plan, k),
    );
    const withProbes = {
      ...container,
      ports: [{ name: "metrics", containerPort: 9090 }],
      readinessProbe: { httpGet: { path: "/readyz", port: "metrics" }, periodSeconds: 5 },
      livenessProbe: {
        httpGet: { path: "/healthz", port: "metrics" },
        periodSeconds: 10,
        failureThreshold: 6,
      },
    };
    objects.push(
      deployment(
        model,
        names.shard(name, k),
        "shard",
        replicas.shards[k],
        plan,
        podSpec(model, "shard", [withProbes]),
        k,
        envHash,
      ),
    );
    objects.push(pdb(model, names.shard(name, k), "shard", k));
  }
  // The template is read at start: a new one rolls the gateways.
  const templateHash: Record<string, string> = {
    ...envHash,
    ...(model.spec.gateway.chatTemplate === undefined
      ? {}
      : { [ANNOTATION_CHAT_TEMPLATE]: sha256Short(model.spec.gateway.chatTemplate) }),
  };
  objects.push(
    deployment(
      model,
      names.gateway(name),
      "gateway",
      replicas.gateway,
      plan,
      gatewayPod(model, "gateway"),
      undefined,
      templateHash,
    ),
  );
  objects.push(pdb(model, names.gateway(name), "gateway"));
  // Disaggregated prefill (ADR 0029): gateways of their own, outside the Service.
  const disaggregation = model.spec.gateway.disaggregation;
  if (disaggregation) {
    objects.push(
      deployment(
        model,
        names.prefill(name),
        "prefill",
        replicas.prefill,
        plan,
        gatewayPod(model, "prefill"),
        undefined,
        templateHash,
      ),
    );
    objects.push(pdb(model, names.prefill(name), "prefill"));
  }
  objects.push({
    apiVersion: "v1",
    kind: "Service",
    metadata: meta(model, names.service(name), "gateway"),
    spec: {
      selector: labelsFor(model, "gateway"),
      sessionAffinity: gateway.sessionAffinity,
      ports: [
        { name: "http", port: gateway.ports.http, targetPort: "http" },
        {
          name: "grpc",
          port: gateway.ports.grpc,
          targetPort: "grpc",
          appProtocol: "grpc",
        } as never,
        { name: "metrics", port: gateway.ports.metrics, targetPort: "metrics" },
      ],
    },
  });
  objects.push(...networkPolicies(model));
  if (model.spec.monitoring?.podMonitor.enabled) objects.push(podMonitor(model));
  return objects;
}

/**
 * With spec.networkPolicy.enabled, a NetworkPolicy per role: gateways admit their HTTP and
 * gRPC ports (gatewayFrom) and their metrics port (metricsFrom); shards and prefill gateways
 * only their metrics port: they connect to NATS themselves, and nothing connects to them. A
 * list of peers absent admits anyone, an empty one no one. With egress.enabled, each also
 * allows only the connections its pods open (egress.ts).
 */
export function networkPolicies(model: DeepSeekModel): V1NetworkPolicy[] {
  const np = model.spec.networkPolicy;
  if (!np?.enabled) return [];
  const rule = (ports: string[], from: object[] | undefined): V1NetworkPolicyIngressRule[] =>
    from?.length === 0
      ? []
      : [
          {
            ports: ports.map((port) => ({ port, protocol: "TCP" })),
            ...(from ? { _from: from } : {}),
          },
        ];
  const egress = np.egress?.enabled === true;
  const policy = (
    component: PolicyRole,
    ingress: V1NetworkPolicyIngressRule[],
  ): V1NetworkPolicy => ({
    apiVersion: "networking.k8s.io/v1",
    kind: "NetworkPolicy",
    metadata: meta(model, `${model.metadata.name}-${component}`, component),
    spec: {
      podSelector: {
        matchLabels: {
          [LABEL_MODEL]: model.metadata.name,
          [LABEL_COMPONENT]: component,
          "app.kubernetes.io/managed-by": MANAGED_BY,
        },
      },
      policyTypes: egress ? ["Ingress", "Egress"] : ["Ingress"],
      ingress,
      ...(egress ? { egress: egressRules(model, component) } : {}),
    },
  });
  const metrics = rule(["metrics"], np.metricsFrom);
  return [
    policy("gateway", [...rule(["http", "grpc"], np.gatewayFrom), ...metrics]),
    policy("shard", metrics),
    ...(model.spec.gateway.disaggregation ? [policy("prefill", metrics)] : []),
  ];
}

/**
 * The PodMonitor that has Prometheus scrape every gateway and shard pod of the model on its
 * `metrics` port. Applied last: a cluster without the Prometheus Operator's CRD refuses it,
 * and that must not keep the rest from being applied. honorLabels: the series' own
 * `namespace` (the model's) wins over the one Prometheus adds (docs/autoscaling.md).
 * podTargetLabels copies the pods' model and role labels onto their series.
 */
export function podMonitor(model: DeepSeekModel): PodMonitor {
  const pm = model.spec.monitoring.podMonitor;
  const base = meta(model, model.metadata.name, "monitoring");
  return {
    apiVersion: "monitoring.coreos.com/v1",
    kind: "PodMonitor",
    metadata: { ...base, labels: { ...pm.labels, ...base.labels } },
    spec: {
      selector: {
        matchLabels: {
          [LABEL_MODEL]: model.metadata.name,
          "app.kubernetes.io/managed-by": MANAGED_BY,
        },
      },
      // The pods' model and role as labels of their series (expertmesh_io_model,
      // app_kubernetes_io_component): what the chart's Grafana dashboard selects by.
      podTargetLabels: [LABEL_MODEL, LABEL_COMPONENT],
      podMetricsEndpoints: [
        {
          port: "metrics",
          path: "/metrics",
          honorLabels: true,
          ...(pm.interval ? { interval: pm.interval } : {}),
        },
      ],
    },
  };
}

/** What must stay the same for a plan to replace another without restarting pods. */
export function planShape(plan: PlacementPlan): string {
  return `${plan.numShards}x${plan.slotsPerShard}/${plan.routedExperts}+${plan.redundantExperts}@${plan.moeLayers[0]}-${plan.moeLayers.at(-1)}`;
}

/** In-cluster URL of the model's OpenAI-compatible API. */
export function endpointOf(model: DeepSeekModel): string {
  return `http://${names.service(model.metadata.name)}.${model.metadata.namespace}.svc:${model.spec.gateway.ports.http}/v1`;
}
