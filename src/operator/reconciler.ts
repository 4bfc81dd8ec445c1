// Reconciles one DeepSeekModel: idempotent and level-based. Reads the model, checks what
// it depends on, plans expert placement, server-side-applies the desired objects, deletes
// the ones it no longer wants, and writes an honest status. Unchanged objects are not
// touched (a no-op apply keeps their resourceVersion).
import type {
  KubernetesObject,
  V1ConfigMap,
  V1Deployment,
  V1PersistentVolumeClaim,
  V1Pod,
} from "@kubernetes/client-node";
import { architectureOf } from "../api/manifest.ts";
import {
  gpuMemoryLabel,
  gpuMemoryShortfalls,
  memoryLimitShortfalls,
  type NodeGpuMemory,
} from "../api/memory.ts";
import { DEFAULT_GPU_RESOURCE, type DeepSeekModel } from "../api/schema.ts";
import { type NatsAuth, natsConnectOptions } from "../moe/nats-connection.ts";
import { type PlacementPlan, planPlacement } from "../moe/placement.ts";
import { parsePlan } from "../moe/plan-json.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import type { Autoscaler } from "./autoscale/autoscaler.ts";
import type { RoleKey } from "./autoscale/load.ts";
import { apiErrorMessage, httpStatus, type KubeClient, kindNotServed } from "./kube.ts";
import { names } from "./labels.ts";
import type { ModelConditionMetrics } from "./metrics.ts";
import { NatsProbe } from "./nats-probe.ts";
import {
  configMapProblems,
  envRefs,
  envSourcesHash,
  gatewayApiKeysProblems,
  gatewayTlsProblems,
  natsAuthOf,
  referencedSecrets,
  type SecretContents,
  type SecretRef,
  secretProblems,
} from "./secrets.ts";
import {
  computeStatus,
  containerProblems,
  failedCreate,
  idleGpusMessage,
  type Problem,
  podsNotCreatedProblem,
  pollAfterMs,
  stalledRolloutProblem,
  statusChanged,
  unschedulableProblem,
  volumeMountProblem,
  waitingOnNode,
} from "./status.ts";
import {
  copiesStuck,
  isPreviousCopy,
  previousCopiesDone,
  previousShardsStep,
  rollWithoutCopies,
  shardsChangingWeights,
} from "./weights-rollout.ts";
import {
  claimNoSmaller,
  type DesiredObject,
  desiredObjects,
  endpointOf,
  planShape,
  type Replicas,
  sharedClaims,
  specReplicas,
} from "./workloads.ts";
import type { WorkResult } from "./workqueue.ts";

/** A claim of the model's namespace, read at most once per reconcile (null: none). */
type ClaimRead = (claimName: string) => Promise<V1PersistentVolumeClaim | null>;

/** How long a pod may wait on its node without a container started before its Events are read. */
const MOUNT_GRACE_MS = 60_000;
/** The most pods whose Events one reconcile reads for volumeMountProblem. */
const MOUNT_EVENT_READS = 8;

/** Thrown to retry a reconcile with backoff after a problem outside the operator's control. */
export class RetryLater extends Error {}

export interface ReconcilerOptions {
  /** Poll interval while a rollout is in progress (ms). */
  progressPollMs?: number;
  /**
   * Poll interval while the model serves, rolled out, and is Degraded only by problems that
   * leave serving alone (a PodMonitor without its CRD, a claim of the wrong access mode):
   * nothing to wait for but a change outside the operator's watch (ms; default 15 s).
   */
  degradedPollMs?: number;
  /**
   * How often a model whose spec.env reads Secrets or ConfigMaps is reconciled anyway, so
   * that a changed value rolls its pods (ms; default 30 s): the operator does not watch them.
   */
  envResyncMs?: number;
  log?: (msg: string) => void;
  /** Where the models' conditions go as metrics (the operator's /metrics). */
  conditionMetrics?: Pick<ModelConditionMetrics, "set" | "forget">;
  /** Load reports, replica decisions and rebalanced plans (absent: replicas from the spec only). */
  autoscaler?: Pick<
    Autoscaler,
    "observe" | "forget" | "replicasFor" | "planFor" | "queueDepth" | "statusFor"
  >;
}

const keyOf = (o: KubernetesObject) => `${o.kind}/${o.metadata?.name}`;

/** The names of the model's shard Deployments. */
const shardNamesOf = (model: DeepSeekModel) =>
  Array.from({ length: model.spec.experts.shards }, (_, k) => names.shard(model.metadata.name, k));

/** The role a Deployment of model `name` serves: gateway, prefill or shard-<k>. */
function roleOf(name: string, d: V1Deployment): RoleKey | undefined {
  const n = d.metadata?.name ?? "";
  if (n === names.gateway(name)) return "gateway";
  if (n === names.prefill(name)) return "prefill";
  const prefix = `${names.shard(name, 0).slice(0, -1)}`;
  const k = n.startsWith(prefix) ? n.slice(prefix.length) : "";
  // A copy on the previous weights (<name>-shard-<k>-prev) is no role of its own.
  return /^\d+$/.test(k) && !isPreviousCopy(d) ? `shard-${k}` : undefined;
}

/** Whether the model may have more than one gateway pod (the spec's, or the autoscaler's). */
function mayRunSeveralGateways(model: DeepSeekModel): boolean {
  const g = model.spec.gateway;
  return g.replicas > 1 || (model.spec.autoscaling.enabled && g.maxReplicas > 1);
}

export class Reconciler {
  readonly #kube: KubeClient;
  readonly #opts: ReconcilerOptions;
  readonly #natsProbe = new NatsProbe();

  /** Listing nodes was forbidden once (namespaced RBAC): GPU memory goes unchecked. */
  #nodesForbidden = false;

  constructor(kube: KubeClient, opts: ReconcilerOptions = {}) {
    this.#kube = kube;
    this.#opts = opts;
  }

  /** Reconciles `namespace/name`. Throws to be retried with backoff. */
  async reconcile(key: string): Promise<WorkResult> {
    const [namespace, name] = key.split("/") as [string, string];
    const model = await this.#kube.getModel(namespace, name);
    if (!model || (model.metadata as { deletionTimestamp?: string }).deletionTimestamp) {
      this.#opts.autoscaler?.forget(key);
      this.#opts.conditionMetrics?.forget(namespace, name);
      return undefined; // garbage collection removes the rest
    }
    const problems: Problem[] = [];
    // The claims the pods mount, each read once per reconcile (what it depends on, then
    // whether it waits for a volume).
    const claims = new Map<string, Promise<V1PersistentVolumeClaim | null>>();
    const claim: ClaimRead = (claimName) => {
      const known = claims.get(claimName);
      if (known) return known;
      const read = this.#kube.readClaim(namespace, claimName);
      claims.set(claimName, read);
      return read;
    };

    // 1. What the pods depend on and the operator cannot create.
    const refs = referencedSecrets(model);
    const secrets = await this.#readSecrets(namespace, refs);
    const configMapRefs = envRefs(model, "ConfigMap");
    const configMaps = await this.#readConfigMaps(namespace, configMapRefs);
    const nats = natsAuthOf(model, secrets);
    // The server is asked only with spec.nats's Secrets all there and sound: with a part
    // missing, its refusal would say nothing new.
    const natsSecretsSound =
      nats.problems.length === 0 &&
      secretProblems(
        namespace,
        refs.filter((r) => r.field.startsWith("spec.nats.")),
        secrets,
      ).length === 0;
    problems.push(
      ...(await this.#missingDependencies(model, nats.auth, natsSecretsSound, claim)),
      ...secretProblems(namespace, refs, secrets),
      ...configMapProblems(namespace, configMapRefs, configMaps),
      ...nats.problems,
      ...gatewayTlsProblems(model, secrets),
      ...gatewayApiKeysProblems(model, secrets),
    );

    // 2. The placement plan (versioned: a changed placement bumps the version). A plan of the
    //    same shape is kept (it may be a rebalanced one); the rebalancer may hand a newer one.
    let plan: PlacementPlan | undefined;
    const current = await this.#currentPlan(model);
    try {
      const next = planPlacement({
        architecture: architectureOf(model),
        numShards: model.spec.experts.shards,
        redundantExperts: model.spec.experts.redundantExperts,
        version: current?.version ?? 1,
        mtpLayers: model.spec.gateway.speculative?.method === "mtp" ? 1 : 0,
      });
      plan = !current
        ? next
        : planShape(current) === planShape(next)
          ? current
          : { ...next, version: current.version + 1 };
      const rebalanced = this.#opts.autoscaler?.planFor(key);
      if (
        rebalanced &&
        rebalanced.version > plan.version &&
        planShape(rebalanced) === planShape(plan)
      )
        plan = rebalanced;
    } catch (err) {
      if (!(err instanceof ExpertMeshError)) throw err;
      problems.push({ reason: "PlanInvalid", message: err.message });
    }
    // Limits below what the pods hold for certain: they would be killed for memory while
    // loading, over and over; nothing is applied until the spec changes.
    if (plan)
      for (const message of memoryLimitShortfalls(model, plan))
        problems.push({ reason: "MemoryLimitTooLow", message });

    // 3. Apply what is wanted (unless a dependency is missing), delete what is not; a
    //    problem that leaves serving alone (a claim of the wrong access mode) applies all.
    let desiredDeployments: V1Deployment[] | undefined;
    if (plan && problems.every((p) => p.servingUnaffected)) {
      const before = await this.#kube.listDeployments(namespace, name);
      const desired = desiredObjects(
        model,
        plan,
        this.#replicas(key, model, plan, before),
        envSourcesHash(model, secrets, configMaps),
      );
      desiredDeployments = desired.filter((o): o is V1Deployment => o.kind === "Deployment");
      try {
        // Other weights, blue/green: the old shards are copied first, and the spec waits
        // until the copies serve (weights-rollout.ts).
        const hold = await this.#previousShards(model, plan, current, before, desiredDeployments);
        if (!hold) problems.push(...(await this.#converge(model, desired)));
      } catch (err) {
        if (httpStatus(err) === 409 || httpStatus(err) === undefined) throw err;
        problems.push({ reason: "ApplyFailed", message: formatError(err) });
      }
      if (current && plan.version !== current.version) {
        await this.#event(
          model,
          "Normal",
          "PlanUpdated",
          `placement plan v${current.version} -> v${plan.version} (${plan.numShards} shards)`,
        );
      }
    }

    // 4. Status from what the cluster reports.
    let [deployments, pods] = await Promise.all([
      this.#kube.listDeployments(namespace, name),
      this.#kube.listPods(namespace, name),
    ]);
    // Copies of the previous weights' shards go once everything else runs the spec (or at
    // once, if they never found room).
    if (desiredDeployments) {
      const stuck = copiesStuck(pods, deployments);
      const done = previousCopiesDone(deployments, desiredDeployments, shardNamesOf(model), stuck);
      for (const copy of done)
        await this.#kube.delete({
          apiVersion: "apps/v1",
          kind: "Deployment",
          metadata: { name: copy.metadata!.name!, namespace },
        });
      if (done.length > 0) {
        const deleted = done.map((d) => d.metadata!.name).join(", ");
        await this.#event(
          model,
          "Normal",
          "PreviousShardsDeleted",
          stuck
            ? `the copies cannot be scheduled and the new weights roll without them: deleted ${deleted}`
            : `every gateway and shard serves the new weights: deleted ${deleted}`,
        );
        pods = pods.filter((p) => !isPreviousCopy(p));
        deployments = deployments.filter((d) => !done.includes(d));
      }
    }
    // A claim no volume binds, and why (before the pods that wait for it).
    if (desiredDeployments) problems.push(...(await this.#pendingClaims(model, claim)));
    const refused = podsNotCreatedProblem(deployments.filter((d) => !isPreviousCopy(d)));
    if (refused) problems.push(refused);
    // Refused pods tried again now, not at the ReplicaSet controller's backoff (up to ~17
    // minutes): the room may be there since (a quota raised, a RuntimeClass made).
    for (const d of deployments.filter((d) => failedCreate(d)))
      await this.#kube.retryRefusedPods(d).catch((err: unknown) => {
        this.#opts.log?.(
          `${model.metadata.namespace}/${d.metadata?.name}: asking its ReplicaSets to try its pods again failed: ${formatError(err)}`,
        );
      });
    const unplaced = unschedulableProblem(pods, deployments);
    if (unplaced) problems.push(unplaced);
    // GPUs the spec requests and no process uses: said once per spec change (the Ready
    // condition's observedGeneration is the last generation a status was written for).
    const idle = idleGpusMessage(model);
    const seen = model.status?.conditions?.find((c) => c.type === "Ready")?.observedGeneration;
    if (idle && seen !== model.metadata.generation)
      await this.#event(model, "Warning", "GPUsIdle", idle);
    // GPUs too small for what a process keeps on one (from the nodes' labels): said once
    // per spec change too.
    if (plan && seen !== model.metadata.generation)
      for (const message of gpuMemoryShortfalls(model, plan, await this.#gpuNodes(model)))
        await this.#event(model, "Warning", "GPUMemoryShort", message);
    problems.push(...containerProblems(pods));
    const unmounted = await this.#volumeMountProblem(model, pods, claim);
    if (unmounted) problems.push(unmounted);
    const stalled = stalledRolloutProblem(deployments);
    if (stalled) problems.push(stalled);
    const scaler = this.#opts.autoscaler;
    if (scaler) {
      const replicas = new Map<RoleKey, number>();
      const ready = new Map<RoleKey, number>();
      for (const d of deployments) {
        const role = roleOf(name, d);
        if (!role) continue;
        replicas.set(role, d.spec?.replicas ?? 1);
        ready.set(role, d.status?.readyReplicas ?? 0);
      }
      scaler.observe(key, model, {
        plan: plan ?? current,
        replicas,
        ready,
        ...(nats.auth ? { natsAuth: nats.auth } : {}),
      });
    }
    const queueDepth = scaler?.queueDepth(key);
    const status = {
      ...computeStatus(
        model,
        {
          deployments,
          pods,
          problems,
          planVersion: plan?.version ?? current?.version,
          endpoint: endpointOf(model),
          ...(queueDepth ? { queueDepth } : {}),
        },
        new Date().toISOString().replace(/\.\d{3}Z$/, "Z"),
      ),
      ...scaler?.statusFor(key),
    };
    this.#opts.conditionMetrics?.set(namespace, name, status.conditions!);
    if (statusChanged(model.status, status)) {
      const wasDegraded = model.status?.conditions?.find((c) => c.type === "Degraded");
      const nowDegraded = status.conditions!.find((c) => c.type === "Degraded")!;
      if (
        nowDegraded.status === "True" &&
        (wasDegraded?.status !== "True" || wasDegraded.reason !== nowDegraded.reason)
      ) {
        await this.#event(model, "Warning", nowDegraded.reason, nowDegraded.message);
      }
      if (nowDegraded.status === "False" && wasDegraded?.status === "True") {
        await this.#event(
          model,
          "Normal",
          "Recovered",
          `no longer degraded (was ${wasDegraded.reason})`,
        );
      }
      const ready = status.conditions!.find((c) => c.type === "Ready")!;
      if (
        ready.status === "True" &&
        model.status?.conditions?.find((c) => c.type === "Ready")?.status !== "True"
      ) {
        await this.#event(model, "Normal", "Ready", ready.message);
      }
      await this.#kube.applyStatus(model, status);
    }

    // Missing dependencies: retry with backoff until they appear (they have no owner to watch).
    if (
      problems.some(
        (p) =>
          p.reason === "PVCNotFound" ||
          p.reason === "SecretNotFound" ||
          p.reason === "ConfigMapNotFound" ||
          p.reason === "ApplyFailed",
      )
    ) {
      throw new RetryLater(problems.map((p) => p.message).join("; "));
    }
    const polled = pollAfterMs(status.conditions!, problems, {
      progress: this.#opts.progressPollMs ?? 5_000,
      degraded: this.#opts.degradedPollMs ?? 15_000,
    });
    // Values spec.env reads from Secrets and ConfigMaps, which the operator does not watch
    // (it may only get them): read again every envResyncMs, so a change rolls the pods.
    const envResync = (model.spec.env ?? []).some((e) => e.valueFrom)
      ? (this.#opts.envResyncMs ?? 30_000)
      : undefined;
    const after =
      polled === undefined
        ? envResync
        : envResync === undefined
          ? polled
          : Math.min(polled, envResync);
    return after === undefined ? undefined : { requeueAfterMs: after };
  }

  /**
   * Replicas per role: the spec's, except in operator autoscaling mode where the autoscaler's
   * decision wins, and without one the Deployment keeps what it has (within min/max), so an
   * operator restart does not undo earlier scaling.
   */
  #replicas(
    key: string,
    model: DeepSeekModel,
    plan: PlacementPlan,
    existing: V1Deployment[],
  ): Replicas {
    const base = specReplicas(model, plan);
    const { autoscaling, gateway, experts } = model.spec;
    if (!autoscaling.enabled || autoscaling.mode !== "operator") return base;
    const decided = this.#opts.autoscaler?.replicasFor(key);
    const now = new Map<RoleKey, number>();
    for (const d of existing) {
      const role = roleOf(model.metadata.name, d);
      if (role && d.spec?.replicas !== undefined) now.set(role, d.spec.replicas);
    }
    const pick = (role: RoleKey, fallback: number | undefined, min: number, max: number) => {
      const n = decided?.get(role) ?? now.get(role);
      return n === undefined ? fallback : Math.min(Math.max(n, min), max);
    };
    const prefill = gateway.disaggregation;
    return {
      gateway: pick("gateway", base.gateway, gateway.minReplicas, gateway.maxReplicas),
      ...(prefill
        ? { prefill: pick("prefill", base.prefill, prefill.minReplicas, prefill.maxReplicas) }
        : {}),
      shards: base.shards.map((n, k) =>
        pick(`shard-${k}`, n, experts.replicas.min, experts.replicas.max),
      ),
    };
  }

  /** The ConfigMaps `refs` name, each read once: their data, or null when one does not exist. */
  #readConfigMaps(namespace: string, refs: SecretRef[]): Promise<SecretContents> {
    return readEach(refs, async (name) => {
      const cm = await this.#kube.core.readNamespacedConfigMap({ name, namespace });
      return {
        ...Object.fromEntries(Object.entries(cm.data ?? {}).map(([k, v]) => [k, Buffer.from(v)])),
        ...base64Values(cm.binaryData),
      };
    });
  }

  /** The Secrets `refs` name, each read once: its data, or null when it does not exist. */
  #readSecrets(namespace: string, refs: SecretRef[]): Promise<SecretContents> {
    return readEach(refs, async (name) =>
      base64Values((await this.#kube.core.readNamespacedSecret({ name, namespace })).data),
    );
  }

  /** `askNats`: whether to ask spec.nats's server (with `natsAuth`): its Secrets are sound. */
  async #missingDependencies(
    model: DeepSeekModel,
    natsAuth: NatsAuth | undefined,
    askNats: boolean,
    claim: ClaimRead,
  ): Promise<Problem[]> {
    const ns = model.metadata.namespace!;
    const out: Problem[] = [];
    const { pvc } = model.spec.model.source;
    if (pvc && (await claim(pvc.claimName)) === null) {
      out.push({
        reason: "PVCNotFound",
        message: `PersistentVolumeClaim ${ns}/${pvc.claimName} (spec.model.source.pvc.claimName) does not exist`,
      });
    }
    // The manifest's claims that every gateway mounts (the prefix cache's disk tier, the
    // batches' folder); those of a StorageClass the operator makes itself (#converge).
    for (const { claimName: shared, field, made } of sharedClaims(model)) {
      if (made) continue;
      const read = await claim(shared);
      const modes = read && (read.status?.accessModes ?? read.spec?.accessModes ?? []);
      if (!modes)
        out.push({
          reason: "PVCNotFound",
          message: `PersistentVolumeClaim ${ns}/${shared} (${field}) does not exist`,
        });
      else if (!modes.includes("ReadWriteMany") && mayRunSeveralGateways(model))
        // Gateways on one node may still share it (ReadWriteOnce): serving goes on, said.
        out.push({
          reason: "SharedPVCNotReadWriteMany",
          message: `PersistentVolumeClaim ${ns}/${shared} (${field}) is ${modes.join(", ") || "of no access mode"}, not ReadWriteMany: gateway pods on other nodes cannot mount it`,
          servingUnaffected: true,
        });
    }
    // Credentials the server refuses, or a TLS handshake that fails, keep every pod out
    // (EM_NATS_CONNECT, restarted over and over); the prefix cache's NATS tier (and
    // disaggregated prefill over it) needs JetStream: the gateways would exit at start
    // without it. A server that does not answer is not judged.
    const remote = model.spec.gateway.kvCache.remoteBytes > 0;
    const url = model.spec.nats.url;
    const tls = natsConnectOptions(url, natsAuth).tls !== undefined;
    if (askNats && (remote || natsAuth?.identity || tls)) {
      const answer = await this.#natsProbe.ask(url, natsAuth);
      if (answer && "tls" in answer)
        out.push({
          reason: "NATSTLSFailed",
          message: `the TLS handshake with the NATS server at ${url} (spec.nats.url) failed: ${answer.tls}`,
        });
      else if (answer && "refused" in answer)
        out.push({
          reason: "NATSAuthRefused",
          message: natsAuth?.identity
            ? `the NATS server at ${url} (spec.nats.url) refused spec.nats's credentials (${answer.refused}): the pods could not connect; give the ones it knows`
            : `the NATS server at ${url} (spec.nats.url) requires credentials (${answer.refused}): give spec.nats.userSecret, tokenSecret, nkeySecret or credentialsSecret`,
        });
      else if (remote && answer?.jetStream === false)
        out.push({
          reason: "NATSJetStreamMissing",
          message: `the NATS server at ${url} (spec.nats.url) has no JetStream, which spec.gateway.kvCache.remoteBytes (the prefix cache's NATS tier${model.spec.gateway.disaggregation ? ", and disaggregated prefill through it" : ""}) needs: turn JetStream on (nats-server -js, or jetstream {} in its configuration) or set remoteBytes to 0`,
        });
    }
    return out;
  }

  /**
   * The claims the pods mount (the weights', the gateways' shared ones, made here or not) that
   * wait for a volume with a Warning Event saying why (no such StorageClass, a provisioner
   * that cannot give the access mode): the pods that mount them cannot start, and the
   * scheduler only says "unbound PersistentVolumeClaims". One still binding without a Warning
   * (WaitForFirstConsumer, a provisioner at work) says nothing.
   */
  async #pendingClaims(model: DeepSeekModel, claim: ClaimRead): Promise<Problem[]> {
    const ns = model.metadata.namespace!;
    const weights = model.spec.model.source.pvc;
    const claims = [
      ...(weights
        ? [{ claimName: weights.claimName, field: "spec.model.source.pvc.claimName" }]
        : []),
      ...sharedClaims(model),
    ];
    const out: Problem[] = [];
    for (const c of claims) {
      const read = await claim(c.claimName);
      const why = read && (await this.#kube.claimPendingWhy(read));
      const cls = "made" in c && c.made ? `, StorageClass ${c.made.storageClassName}` : "";
      if (why)
        out.push({
          reason: "PVCPending",
          message: `PersistentVolumeClaim ${ns}/${c.claimName} (${c.field}${cls}) is Pending: ${why.replace(/\s+/g, " ").slice(0, 500)}`,
        });
    }
    return out;
  }

  /**
   * Pods that have waited on their nodes for a minute without a container started, and why:
   * the newest FailedMount or FailedAttachVolume Warning Event of each (at most
   * MOUNT_EVENT_READS of them, by name), a volume the kubelet cannot mount or the
   * attach/detach controller cannot attach there. Without it they only "wait in
   * ContainerCreating".
   */
  async #volumeMountProblem(
    model: DeepSeekModel,
    pods: readonly V1Pod[],
    claim: ClaimRead,
  ): Promise<Problem | undefined> {
    const now = Date.now();
    const waiting = pods
      .filter((p) => waitingOnNode(p, now, MOUNT_GRACE_MS))
      .sort((a, b) => (a.metadata?.name ?? "").localeCompare(b.metadata?.name ?? ""))
      .slice(0, MOUNT_EVENT_READS);
    const stuck: { pod: V1Pod; why: string }[] = [];
    for (const pod of waiting) {
      const why = await this.#kube.podMountWhy(pod);
      if (why) stuck.push({ pod, why });
    }
    if (stuck.length === 0) return undefined;
    const pvc = model.spec.model.source.pvc;
    const read = pvc && (await claim(pvc.claimName));
    return volumeMountProblem(
      stuck,
      read
        ? {
            namespace: model.metadata.namespace!,
            claimName: pvc.claimName,
            volumeName: read.spec?.volumeName,
            accessModes: read.status?.accessModes ?? read.spec?.accessModes ?? [],
          }
        : undefined,
    );
  }

  async #currentPlan(model: DeepSeekModel): Promise<PlacementPlan | undefined> {
    try {
      const cm: V1ConfigMap = await this.#kube.core.readNamespacedConfigMap({
        name: names.plan(model.metadata.name),
        namespace: model.metadata.namespace!,
      });
      const text = cm.data?.["plan.json"];
      return text ? parsePlan(text) : undefined;
    } catch (err) {
      if (httpStatus(err) === 404 || err instanceof ExpertMeshError) return undefined;
      throw err;
    }
  }

  /**
   * spec.experts.weightsRollout BlueGreen: copies the shard Deployments whose weights the
   * spec changes (weights-rollout.ts) and says whether the spec must wait for them. Only
   * with the plan unchanged: a copy reads the plan's ConfigMap, which a new shape replaces.
   */
  async #previousShards(
    model: DeepSeekModel,
    plan: PlacementPlan,
    current: PlacementPlan | undefined,
    before: V1Deployment[],
    desired: V1Deployment[],
  ): Promise<boolean> {
    if (model.spec.experts.weightsRollout !== "BlueGreen") {
      // Rolling to other weights: said when the new templates are about to be applied (the
      // Deployments run the old weights once, so this is said once per change).
      const changing = shardsChangingWeights(before, desired, shardNamesOf(model));
      if (changing.length > 0)
        await this.#event(
          model,
          "Warning",
          "WeightsRollingInPlace",
          `spec.model.source names other weights and spec.experts.weightsRollout is Rolling: ${changing.join(", ")} and the gateways roll at once, so an old gateway fails requests (EM_DISPATCH_UNAVAILABLE) from when one of its shards is replaced until the new gateways are ready; weightsRollout BlueGreen keeps the old weights' shards serving meanwhile (a second set of shard pods for a while)`,
        );
      return false;
    }
    if (current?.version !== plan.version) return false;
    const step = previousShardsStep(before, desired, shardNamesOf(model));
    for (const copy of step.create) await this.#kube.apply(copy);
    if (step.create.length > 0) {
      await this.#event(
        model,
        "Normal",
        "PreviousShardsCreated",
        `spec.model.source names other weights: ${step.create.map((d) => d.metadata!.name).join(", ")} keep the previous ones for the old gateways until the new ones are ready (weightsRollout BlueGreen)`,
      );
      return true;
    }
    if (!step.hold) return false;
    // No room for the copies beside the running pods, for blueGreenWaitSeconds: waiting would
    // hold the new weights for ever, so they roll as with Rolling (and the copies go).
    const ns = model.metadata.namespace!;
    const copyPods = (await this.#kube.listPods(ns, model.metadata.name)).filter(isPreviousCopy);
    const copies = before.filter(isPreviousCopy);
    const waitSeconds = model.spec.experts.blueGreenWaitSeconds ?? 600;
    const stuck = rollWithoutCopies(copyPods, waitSeconds * 1000, Date.now(), copies)
      ? (unschedulableProblem(copyPods) ?? podsNotCreatedProblem(copies))
      : undefined;
    if (!stuck) return true;
    await this.#event(
      model,
      "Warning",
      "PreviousShardsUnschedulable",
      `${stuck.message}; for ${waitSeconds} s (spec.experts.blueGreenWaitSeconds): rolling to the new weights without them (old gateways fail requests until the new ones are ready)`,
    );
    return false;
  }

  /**
   * Applies every desired object in order; deletes owned objects no longer desired. A
   * PodMonitor the cluster has no CRD for, or a NetworkPolicy that cannot be applied, is a
   * problem that leaves serving alone.
   */
  async #converge(model: DeepSeekModel, desired: DesiredObject[]): Promise<Problem[]> {
    const ns = model.metadata.namespace!;
    const problems: Problem[] = [];
    const existing = new Map(
      (await this.#kube.listOwned(ns, model.metadata.name)).map((o) => [keyOf(o), o]),
    );
    for (const wanted of desired) {
      const before = existing.get(keyOf(wanted as KubernetesObject));
      const obj =
        before && wanted.kind === "PersistentVolumeClaim"
          ? claimNoSmaller(wanted as V1PersistentVolumeClaim, before)
          : wanted;
      let after: KubernetesObject;
      try {
        after = await this.#kube.apply(obj as KubernetesObject);
      } catch (err) {
        if (obj.kind === "PersistentVolumeClaim" && before) {
          // A claim the gateways mount already: a larger size its class cannot give, or
          // another class (immutable), is refused; they serve on with the claim as it is.
          const c = sharedClaims(model).find((s) => s.claimName === obj.metadata?.name);
          problems.push({
            reason: "SharedPVCApplyFailed",
            message: `PersistentVolumeClaim ${ns}/${obj.metadata?.name} (${c?.field ?? "a shared claim"}): ${apiErrorMessage(err)}`,
            servingUnaffected: true,
          });
          continue;
        }
        if (obj.kind === "NetworkPolicy") {
          // Isolation asked for and not had (an older chart's RBAC, a peer the API server
          // refuses): reported; the pods serve on as before.
          problems.push({
            reason: "NetworkPolicyApplyFailed",
            message: `NetworkPolicy ${ns}/${obj.metadata?.name} (spec.networkPolicy): ${apiErrorMessage(err)}`,
            servingUnaffected: true,
          });
          continue;
        }
        if (obj.kind !== "PodMonitor") throw err;
        // The PodMonitor is an extra: whatever keeps it out (no CRD, an older chart's RBAC, a
        // policy) is reported, and the rest converges (deletes below included).
        problems.push(
          kindNotServed(err)
            ? {
                reason: "PodMonitorCRDNotFound",
                message:
                  "spec.monitoring.podMonitor.enabled, but this cluster does not serve monitoring.coreos.com/v1 PodMonitor: install the Prometheus Operator's CRDs, or turn it off",
                servingUnaffected: true,
              }
            : {
                reason: "PodMonitorApplyFailed",
                message: `PodMonitor ${ns}/${obj.metadata?.name} (spec.monitoring.podMonitor): ${apiErrorMessage(err)}`,
                servingUnaffected: true,
              },
        );
        continue;
      }
      if (!before)
        await this.#event(model, "Normal", "Created", `created ${keyOf(obj as KubernetesObject)}`);
      else if (before.metadata?.resourceVersion !== after.metadata?.resourceVersion) {
        await this.#event(model, "Normal", "Updated", `updated ${keyOf(obj as KubernetesObject)}`);
      }
    }
    const wanted = new Set(desired.map((o) => keyOf(o as KubernetesObject)));
    for (const [key, obj] of existing) {
      // Copies of the previous weights' shards are deleted when done (reconcile, step 4).
      if (wanted.has(key) || isPreviousCopy(obj)) continue;
      await this.#kube.delete(obj);
      await this.#event(model, "Normal", "Deleted", `deleted ${key} (no longer in the spec)`);
    }
    return problems;
  }

  /**
   * The memory of one GPU of each role's resource on the nodes that offer it and that the
   * model's nodeSelector admits (their GPU feature discovery labels), for roles that request
   * GPUs; empty where unknown. (Affinity and taints are not weighed.) Advisory:
   * a failed list is logged and checks nothing; a forbidden one (the chart's namespaced mode
   * grants no nodes) is logged once and not tried again.
   */
  async #gpuNodes(
    model: DeepSeekModel,
  ): Promise<{ gateway: NodeGpuMemory[]; experts: NodeGpuMemory[] }> {
    const of = async (gpus: number, resource: string | undefined): Promise<NodeGpuMemory[]> => {
      const label = gpuMemoryLabel(resource ?? DEFAULT_GPU_RESOURCE);
      if (gpus === 0 || label === null || this.#nodesForbidden) return [];
      try {
        return await this.#kube.nodeGpuMemory(label, model.spec.scheduling.nodeSelector);
      } catch (err) {
        if (httpStatus(err) === 403) {
          this.#nodesForbidden = true;
          this.#opts.log?.(
            "listing nodes is forbidden (namespaced RBAC): GPU memory is not checked against the models' needs",
          );
        } else this.#opts.log?.(`listing GPU nodes (${label}) failed: ${apiErrorMessage(err)}`);
        return [];
      }
    };
    const { gateway, experts } = model.spec;
    return {
      gateway: await of(gateway.gpus, gateway.gpuResource),
      experts: await of(experts.gpusPerShard, experts.gpuResource),
    };
  }

  async #event(
    model: DeepSeekModel,
    type: "Normal" | "Warning",
    reason: string,
    message: string,
  ): Promise<void> {
    try {
      await this.#kube.event(model, type, reason, message);
    } catch (err) {
      this.#opts.log?.(
        `event ${reason} on ${model.metadata.namespace}/${model.metadata.name} failed: ${formatError(err)}`,
      );
    }
  }
}

/** Each object `refs` name read once: its data, or null where it does not exist (404). */
async function readEach(
  refs: SecretRef[],
  read: (name: string) => Promise<Record<string, Buffer>>,
): Promise<SecretContents> {
  const contents = new Map<string, Record<string, Buffer> | null>();
  for (const { name } of refs) {
    if (contents.has(name)) continue;
    try {
      contents.set(name, await read(name));
    } catch (err) {
      if (httpStatus(err) !== 404) throw err;
      contents.set(name, null);
    }
  }
  return contents;
}

/** A Secret's data (or a ConfigMap's binaryData): base64 values decoded. */
function base64Values(data: Record<string, string> | undefined): Record<string, Buffer> {
  return Object.fromEntries(
    Object.entries(data ?? {}).map(([k, v]) => [k, Buffer.from(v, "base64")]),
  );
}
