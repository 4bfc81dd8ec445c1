// The operator's Kubernetes I/O in one place: server-side apply under one field manager,
// owned-object listing and deletion, the DeepSeekModel and its status, Events.
import {
  AppsV1Api,
  CoreV1Api,
  type CoreV1Event,
  CustomObjectsApi,
  type KubeConfig,
  type KubernetesObject,
  KubernetesObjectApi,
  PatchStrategy,
  PolicyV1Api,
  setHeaderOptions,
  type V1Deployment,
  type V1PersistentVolumeClaim,
  type V1Pod,
  type V1ReplicaSet,
} from "@kubernetes/client-node";
import type { NodeGpuMemory } from "../api/memory.ts";
import {
  type DeepSeekModel,
  type DeepSeekModelStatus,
  GROUP,
  PLURAL,
  VERSION,
} from "../api/schema.ts";
import { formatError } from "../util/errors.ts";
import { FIELD_MANAGER, ownedSelector } from "./labels.ts";

export function httpStatus(err: unknown): number | undefined {
  return (err as { code?: number })?.code;
}

/**
 * What the API server said of a refused request: its Status's message (the client's error
 * carries the whole HTTP exchange), or the error's own words.
 */
export function apiErrorMessage(err: unknown): string {
  const body = (err as { body?: unknown } | null)?.body;
  if (typeof body === "string") {
    try {
      const status = JSON.parse(body) as { message?: unknown };
      if (typeof status.message === "string" && status.message !== "") return status.message;
    } catch {
      // not JSON: the error's own words below
    }
  }
  return formatError(err);
}

/**
 * Whether `err` says the cluster does not serve the object's kind (another project's CRD
 * not installed): the client's discovery of the group answers 404, or lists no such kind.
 */
export function kindNotServed(err: unknown): boolean {
  return (
    httpStatus(err) === 404 ||
    /Unrecognized API version and kind/.test((err as Error | undefined)?.message ?? "")
  );
}

/**
 * The kinds the operator creates, for listing what it owns. Optional ones (another
 * project's CRD) may not be served, or not be readable under an older chart's RBAC: then
 * the operator cannot have made any.
 */
const OWNED_KINDS = [
  { apiVersion: "v1", kind: "ConfigMap" },
  { apiVersion: "apps/v1", kind: "Deployment" },
  { apiVersion: "v1", kind: "Service" },
  { apiVersion: "policy/v1", kind: "PodDisruptionBudget" },
  // (the shared claims of a StorageClass: an older chart's RBAC only reads claims)
  { apiVersion: "v1", kind: "PersistentVolumeClaim", optional: true },
  // Optional: an older chart's RBAC does not grant them (the model says so when it asks).
  { apiVersion: "networking.k8s.io/v1", kind: "NetworkPolicy", optional: true },
  { apiVersion: "monitoring.coreos.com/v1", kind: "PodMonitor", optional: true },
] as const;

/** How recent a pod's volume Warning must be to say why it waits (podMountWhy). */
const MOUNT_EVENT_FRESH_MS = 180_000;

/** When an Event last happened (ms): its series' or its own last time, else its first. */
const eventTime = (e: CoreV1Event) =>
  new Date(
    e.series?.lastObservedTime ?? e.lastTimestamp ?? e.eventTime ?? e.firstTimestamp ?? 0,
  ).getTime();

/**
 * Whether a pod's Event says a volume keeps failing to attach or mount: FailedMount or
 * FailedAttachVolume, said twice or more, the last time within MOUNT_EVENT_FRESH_MS of `now`.
 */
export const failingMount = (e: CoreV1Event, now: number) =>
  (e.reason === "FailedMount" || e.reason === "FailedAttachVolume") &&
  (e.count ?? e.series?.count ?? 1) >= 2 &&
  now - eventTime(e) <= MOUNT_EVENT_FRESH_MS;

/** The annotation that asks the ReplicaSet controller to try a refused ReplicaSet's pods again. */
export const RETRY_ANNOTATION = "expertmesh.io/pods-retried-at";
/** A ReplicaSet whose pods are refused is asked to try again at most this often. */
export const RETRY_EVERY_MS = 30_000;

/**
 * Of Deployment `d`'s ReplicaSets, those whose pods the API server refuses to create
 * (ReplicaFailure FailedCreate) and that were not asked to try again in the last
 * RETRY_EVERY_MS. The ReplicaSet controller tries a refused ReplicaSet again with a backoff
 * that doubles up to ~17 minutes, so a quota raised (or a RuntimeClass made) after minutes of
 * refusals would wait that long; an update of the ReplicaSet (an annotation) makes it try at
 * once.
 */
export function replicaSetsToRetry(
  d: V1Deployment,
  replicaSets: readonly V1ReplicaSet[],
  now: number,
): V1ReplicaSet[] {
  const uid = d.metadata?.uid;
  return replicaSets.filter((rs) => {
    if (!uid || !rs.metadata?.ownerReferences?.some((o) => o.uid === uid)) return false;
    const refused = rs.status?.conditions?.some(
      (c) => c.type === "ReplicaFailure" && c.status === "True" && c.reason === "FailedCreate",
    );
    const asked = Date.parse(rs.metadata.annotations?.[RETRY_ANNOTATION] ?? "");
    return refused && !(now - asked < RETRY_EVERY_MS);
  });
}

/**
 * The kubelet's Normal Events of a pod's containers: it pulls, creates and starts them only
 * once every volume of the pod is attached and mounted.
 */
const PAST_MOUNTS = new Set(["Pulling", "Pulled", "Created", "Started"]);

/**
 * Of a pod's Events, the newest that says a volume keeps failing to attach or mount
 * (failingMount); none when the kubelet went on to the containers since (a failure that
 * passed: the pod now waits on its image, not its volumes).
 */
export function mountFailure(events: readonly CoreV1Event[], now: number): CoreV1Event | undefined {
  const failing = events
    .filter((e) => e.type === "Warning" && failingMount(e, now))
    .sort((a, b) => eventTime(b) - eventTime(a))[0];
  if (!failing) return undefined;
  const since = eventTime(failing);
  const past = events.some(
    (e) => e.type === "Normal" && PAST_MOUNTS.has(e.reason ?? "") && eventTime(e) >= since,
  );
  return past ? undefined : failing;
}

export class KubeClient {
  readonly kc: KubeConfig;
  readonly objects: KubernetesObjectApi;
  readonly core: CoreV1Api;
  readonly apps: AppsV1Api;
  readonly policy: PolicyV1Api;
  readonly custom: CustomObjectsApi;
  readonly identity: string;
  readonly #log: (message: string) => void;
  /** "namespace kind" pairs whose list was forbidden, logged once each. */
  readonly #forbidden = new Set<string>();

  constructor(kc: KubeConfig, identity: string, log: (message: string) => void = () => {}) {
    this.kc = kc;
    this.identity = identity;
    this.#log = log;
    this.objects = KubernetesObjectApi.makeApiClient(kc);
    this.core = kc.makeApiClient(CoreV1Api);
    this.apps = kc.makeApiClient(AppsV1Api);
    this.policy = kc.makeApiClient(PolicyV1Api);
    this.custom = kc.makeApiClient(CustomObjectsApi);
  }

  /** Server-side apply; returns the object as stored. */
  async apply<T extends KubernetesObject>(obj: T): Promise<T> {
    return (await this.objects.patch(
      obj,
      undefined,
      undefined,
      FIELD_MANAGER,
      true,
      PatchStrategy.ServerSideApply,
    )) as T;
  }

  async delete(obj: KubernetesObject): Promise<void> {
    try {
      await this.objects.delete(obj, undefined, undefined, undefined, undefined, "Background");
    } catch (err) {
      if (httpStatus(err) !== 404) throw err;
    }
  }

  /** Everything the operator made for model `name` (by label). */
  async listOwned(namespace: string, name: string): Promise<KubernetesObject[]> {
    const selector = ownedSelector(name);
    const lists = await Promise.all(
      OWNED_KINDS.map(async (k) => {
        const { apiVersion, kind } = k;
        try {
          const list = await this.objects.list(
            apiVersion,
            kind,
            namespace,
            undefined,
            undefined,
            undefined,
            undefined,
            selector,
          );
          return list.items.map((o) => ({ ...o, apiVersion, kind }));
        } catch (err) {
          if (!("optional" in k)) throw err;
          if (kindNotServed(err)) return [];
          if (httpStatus(err) !== 403) throw err;
          // An older chart's RBAC: nothing of this kind can be seen, so none made earlier can
          // be deleted either. Said once per namespace, not on every reconcile.
          this.#forbiddenOnce(
            `${namespace} ${kind}`,
            `cannot list ${kind} objects in ${namespace} (403 Forbidden): the operator's RBAC predates them ` +
              `(upgrade the chart); a ${kind} made earlier for a model there is not deleted when it is turned off`,
          );
          return [];
        }
      }),
    );
    return lists.flat();
  }

  async listDeployments(namespace: string, name: string): Promise<V1Deployment[]> {
    return (
      await this.apps.listNamespacedDeployment({ namespace, labelSelector: ownedSelector(name) })
    ).items;
  }

  async listPods(namespace: string, name: string): Promise<V1Pod[]> {
    return (await this.core.listNamespacedPod({ namespace, labelSelector: ownedSelector(name) }))
      .items;
  }

  /** The model, or undefined when it no longer exists. */
  async getModel(namespace: string, name: string): Promise<DeepSeekModel | undefined> {
    try {
      return (await this.custom.getNamespacedCustomObject({
        group: GROUP,
        version: VERSION,
        namespace,
        plural: PLURAL,
        name,
      })) as DeepSeekModel;
    } catch (err) {
      if (httpStatus(err) === 404) return undefined;
      throw err;
    }
  }

  /** Writes the status subresource (server-side apply of status only). */
  async applyStatus(model: DeepSeekModel, status: DeepSeekModelStatus): Promise<void> {
    await this.custom.patchNamespacedCustomObjectStatus(
      {
        group: GROUP,
        version: VERSION,
        namespace: model.metadata.namespace!,
        plural: PLURAL,
        name: model.metadata.name,
        body: {
          apiVersion: model.apiVersion,
          kind: model.kind,
          metadata: { name: model.metadata.name, namespace: model.metadata.namespace },
          status,
        },
        fieldManager: FIELD_MANAGER,
        force: true,
      },
      setHeaderOptions("Content-Type", PatchStrategy.ServerSideApply),
    );
  }

  /** A PersistentVolumeClaim, or null when it does not exist. */
  async readClaim(namespace: string, name: string): Promise<V1PersistentVolumeClaim | null> {
    try {
      return await this.core.readNamespacedPersistentVolumeClaim({ name, namespace });
    } catch (err) {
      if (httpStatus(err) === 404) return null;
      throw err;
    }
  }

  /**
   * Why claim `pvc` waits for a volume: its newest Warning Event (a provisioner's
   * ProvisioningFailed, a StorageClass not found), when it is Pending and has one; else null.
   * Events the operator may not list (an older chart's RBAC) say nothing (logged once).
   */
  async claimPendingWhy(pvc: V1PersistentVolumeClaim): Promise<string | null> {
    if (pvc.status?.phase !== "Pending") return null;
    return await this.#newestWarning("PersistentVolumeClaim", pvc.metadata);
  }

  /**
   * Why pod `pod` cannot start its containers: its newest Warning Event about its volumes
   * (the kubelet's FailedMount, the attach/detach controller's FailedAttachVolume) that keeps
   * coming (said twice or more, the last time within MOUNT_EVENT_FRESH_MS of `now`: the
   * kubelet retries a failing mount at least every ~2 minutes; a one-off failure at start,
   * such as a ConfigMap not yet synced, is not it) and not followed by the kubelet pulling or
   * starting its containers (mountFailure), as `reason: message`; else null (as
   * claimPendingWhy when Events may not be listed).
   */
  async podMountWhy(pod: V1Pod, now = Date.now()): Promise<string | null> {
    const events = await this.#events("Pod", pod.metadata);
    const failing = events && mountFailure(events, now);
    return failing ? `${failing.reason}: ${failing.message?.trim() ?? ""}` : null;
  }

  /**
   * Asks the ReplicaSet controller to try again at once to create the pods it was refused
   * for Deployment `d` (replicaSetsToRetry); the names of the ReplicaSets asked. An older
   * chart's RBAC (no ReplicaSets) is logged once and asks nothing.
   */
  async retryRefusedPods(d: V1Deployment, now = Date.now()): Promise<string[]> {
    const namespace = d.metadata?.namespace ?? "";
    const labels = d.spec?.selector?.matchLabels ?? {};
    let replicaSets: V1ReplicaSet[];
    try {
      replicaSets = (
        await this.apps.listNamespacedReplicaSet({
          namespace,
          labelSelector: Object.entries(labels)
            .map(([k, v]) => `${k}=${v}`)
            .join(","),
        })
      ).items;
    } catch (err) {
      if (httpStatus(err) !== 403) throw err;
      this.#forbiddenOnce(
        `${namespace} ReplicaSet`,
        `cannot list ReplicaSets in ${namespace} (403 Forbidden): the operator's RBAC predates it (upgrade the chart); pods refused (a ResourceQuota without room) are tried again only at the ReplicaSet controller's backoff, up to ~17 minutes after the room is there`,
      );
      return [];
    }
    const asked: string[] = [];
    for (const rs of replicaSetsToRetry(d, replicaSets, now)) {
      await this.apps.patchNamespacedReplicaSet(
        {
          name: rs.metadata!.name!,
          namespace,
          body: { metadata: { annotations: { [RETRY_ANNOTATION]: new Date(now).toISOString() } } },
        },
        setHeaderOptions("Content-Type", PatchStrategy.MergePatch),
      );
      asked.push(rs.metadata!.name!);
    }
    return asked;
  }

  /** The newest Warning Event about an object, as `reason: message`. */
  async #newestWarning(
    kind: string,
    object: { namespace?: string; uid?: string } | undefined,
  ): Promise<string | null> {
    const events = await this.#events(kind, object, "Warning");
    const newest = events?.sort((a, b) => eventTime(b) - eventTime(a))[0];
    return newest ? `${newest.reason}: ${newest.message?.trim() ?? ""}` : null;
  }

  /** The Events about an object (of `type` only, when given); null when they may not be read. */
  async #events(
    kind: string,
    object: { namespace?: string; uid?: string } | undefined,
    type?: "Warning",
  ): Promise<CoreV1Event[] | null> {
    const namespace = object?.namespace ?? "";
    if (!object?.uid) return null;
    try {
      return (
        await this.core.listNamespacedEvent({
          namespace,
          fieldSelector: `involvedObject.kind=${kind},involvedObject.uid=${object.uid}${type ? `,type=${type}` : ""}`,
        })
      ).items;
    } catch (err) {
      if (httpStatus(err) !== 403) throw err;
      this.#forbiddenOnce(
        `${namespace} Event`,
        `cannot list Events in ${namespace} (403 Forbidden): the operator's RBAC predates it (upgrade the chart); a claim that waits for a volume, or a pod that cannot mount one, is not said why`,
      );
      return null;
    }
  }

  /**
   * The nodes labelled with `label` (a GPU's memory in MiB, as GPU feature discovery writes
   * it: gpuMemoryLabel) and matching `nodeSelector` (the model's spec.scheduling), and each
   * one's bytes; nodes whose label is not a number are left out.
   */
  async nodeGpuMemory(
    label: string,
    nodeSelector: Record<string, string> = {},
  ): Promise<NodeGpuMemory[]> {
    const selector = [label, ...Object.entries(nodeSelector).map(([k, v]) => `${k}=${v}`)];
    const nodes = await this.core.listNode({ labelSelector: selector.join(",") });
    return nodes.items.flatMap((n) => {
      const mib = Number(n.metadata?.labels?.[label]);
      return Number.isFinite(mib) && mib > 0
        ? [{ node: n.metadata?.name ?? "", bytes: mib * 2 ** 20 }]
        : [];
    });
  }

  /**
   * Logs `message` once for `key` ("namespace kind"): a list the operator's RBAC forbids
   * (an older chart's) is said once, not on every reconcile.
   */
  #forbiddenOnce(key: string, message: string): void {
    if (this.#forbidden.has(key)) return;
    this.#forbidden.add(key);
    this.#log(message);
  }

  /** Records an Event on the model (shown by `kubectl describe dsm`). */
  async event(
    model: DeepSeekModel,
    type: "Normal" | "Warning",
    reason: string,
    message: string,
  ): Promise<void> {
    const now = new Date();
    const namespace = model.metadata.namespace!;
    await this.core.createNamespacedEvent({
      namespace,
      body: {
        metadata: { generateName: `${model.metadata.name}.`, namespace },
        involvedObject: {
          apiVersion: model.apiVersion,
          kind: model.kind,
          name: model.metadata.name,
          namespace,
          uid: model.metadata.uid,
          resourceVersion: model.metadata.resourceVersion,
        },
        type,
        reason,
        message: message.slice(0, 1024),
        source: { component: FIELD_MANAGER },
        reportingComponent: FIELD_MANAGER,
        reportingInstance: this.identity,
        firstTimestamp: now,
        lastTimestamp: now,
        count: 1,
      },
    });
  }
}
