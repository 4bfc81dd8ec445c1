// Runs `expertmesh operator` as a real process against the test control plane, under the
// Helm chart's ServiceAccount (a token from the TokenRequest API), never as admin.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { AppsV1Api, CoreV1Api, CustomObjectsApi, type V1Deployment } from "@kubernetes/client-node";
import { expect } from "vitest";
import type { DeepSeekModel } from "../../src/api/schema.ts";
import { writeKubeconfig } from "../env/pki.ts";
import { ManagedProcess } from "../env/process.ts";
import { runCli } from "./cli.ts";
import { adminKubeConfig, testEnv } from "./env.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const root = fileURLToPath(new URL("../../", import.meta.url));
const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };
const kc = () => adminKubeConfig();
const core = () => kc().makeApiClient(CoreV1Api);
const apps = () => kc().makeApiClient(AppsV1Api);
const custom = () => kc().makeApiClient(CustomObjectsApi);

/** A kubeconfig file for a ServiceAccount, with a fresh token (1 h). */
export async function serviceAccountKubeconfig(
  namespace: string,
  serviceAccount: string,
): Promise<string> {
  const core = adminKubeConfig().makeApiClient(CoreV1Api);
  const tr = await core.createNamespacedServiceAccountToken({
    name: serviceAccount,
    namespace,
    body: { spec: { audiences: [], expirationSeconds: 3600 } },
  });
  const env = testEnv();
  const path = join(env.runDir, `${namespace}-${serviceAccount}.kubeconfig`);
  writeKubeconfig(path, env.kube.server, env.kube.caCert, serviceAccount, tr.status!.token!);
  return path;
}

export interface RunningOperator {
  identity: string;
  process: ManagedProcess;
  metricsUrl: string;
  /** Metric value by exact series text (e.g. 'expertmesh_operator_is_leader'), or undefined. */
  metric(series: string): Promise<number | undefined>;
  log(): string;
}

/** Starts an operator process and waits until it serves health (not leadership). */
export async function startOperator(opts: {
  kubeconfig: string;
  identity: string;
  leaseNamespace: string;
  leaseDurationSeconds?: number;
  namespaces?: string[];
  /** More `expertmesh operator` flags. */
  args?: string[];
}): Promise<RunningOperator> {
  const env = testEnv();
  const args = [
    mainTs,
    "operator",
    `--kubeconfig=${opts.kubeconfig}`,
    `--identity=${opts.identity}`,
    `--lease-namespace=${opts.leaseNamespace}`,
    `--lease-duration=${opts.leaseDurationSeconds ?? 3}`,
    "--metrics-port=0",
    "--metrics-host=127.0.0.1",
    ...(opts.namespaces ?? []).map((n) => `--namespace=${n}`),
    ...(opts.args ?? []),
  ];
  const proc = new ManagedProcess(
    `operator-${opts.identity}`,
    process.execPath,
    args,
    join(env.runDir, "logs"),
  );
  let port = 0;
  await proc.waitUntil("serving health", async () => {
    const m = /metrics and health on :(\d+)/.exec(readFileSync(proc.logPath, "utf8"));
    if (!m) return false;
    port = Number(m[1]);
    return (await fetch(`http://127.0.0.1:${port}/healthz`)).ok;
  });
  const metricsUrl = `http://127.0.0.1:${port}/metrics`;
  return {
    identity: opts.identity,
    process: proc,
    metricsUrl,
    async metric(series) {
      const text = await (await fetch(metricsUrl)).text();
      const line = text.split("\n").find((l) => l.startsWith(`${series} `));
      return line ? Number(line.split(" ")[1]) : undefined;
    },
    log: () => readFileSync(proc.logPath, "utf8"),
  };
}

/** Waits until the operator's log says it became leader. */
export async function waitForLeadership(op: RunningOperator, timeoutMs = 30_000): Promise<void> {
  await op.process.waitUntil("leader", async () => op.log().includes("became leader"), timeoutMs);
  // and its informers synced
  await op.process.waitUntil(
    "reconciling",
    async () => op.log().includes("reconciling DeepSeekModels"),
    timeoutMs,
  );
  await sleep(100);
}

/** A DeepSeekModel manifest of the tiny-v2 preset with weights from PVC `weights`. */
export function model(
  name: string,
  namespace: string,
  spec: Record<string, unknown> = {},
): Record<string, unknown> {
  return {
    apiVersion: "expertmesh.io/v1alpha1",
    kind: "DeepSeekModel",
    metadata: { name, namespace },
    spec: {
      model: { preset: "tiny-v2", source: { pvc: { claimName: "weights" } } },
      experts: { shards: 2 },
      ...spec,
    },
  };
}

/** A model's condition of `type` (Ready, Progressing, Degraded), if it has one. */
export const condition = (m: DeepSeekModel, type: string) =>
  m.status?.conditions?.find((c) => c.type === type);

/** Reads a DeepSeekModel as admin. */
export async function getModel(namespace: string, name: string): Promise<DeepSeekModel> {
  return (await custom().getNamespacedCustomObject({ ...G, namespace, name })) as DeepSeekModel;
}

/** A bound volume for the weights: a hostPath PV pre-bound to a claim `weights` in `namespace`. */
export async function createWeightsVolume(
  namespace: string,
  claim = "weights",
  mode: "ReadOnlyMany" | "ReadWriteMany" | "ReadWriteOnce" = "ReadOnlyMany",
): Promise<void> {
  const pv = `${namespace}-${claim}`;
  await core().createPersistentVolume({
    body: {
      metadata: { name: pv },
      spec: {
        capacity: { storage: "1Gi" },
        accessModes: [mode],
        storageClassName: "",
        hostPath: { path: `/tmp/${pv}` },
        claimRef: { namespace, name: claim },
      },
    },
  });
  await core().createNamespacedPersistentVolumeClaim({
    namespace,
    body: {
      metadata: { name: claim },
      spec: {
        accessModes: [mode],
        storageClassName: "",
        volumeName: pv,
        resources: { requests: { storage: "1Gi" } },
      },
    },
  });
}

/** The Deployments the operator made for model `name`. */
export async function ownedDeployments(namespace: string, name: string): Promise<V1Deployment[]> {
  return (
    await apps().listNamespacedDeployment({
      namespace,
      labelSelector: `expertmesh.io/model=${name}`,
    })
  ).items;
}

/** helm install of the chart (operator replicas 0: the tests run the operator themselves). */
export async function helmInstall(
  release: string,
  namespace: string,
  extra: string[] = [],
): Promise<void> {
  const env = testEnv();
  const helm = await runCli(
    env.binaries.helm,
    [
      "install",
      release,
      `${root}charts/expertmesh`,
      "--namespace",
      namespace,
      "--create-namespace",
      "--kubeconfig",
      env.kube.kubeconfig,
      "--set",
      "replicaCount=0",
      ...extra,
      "--wait=false",
    ],
    undefined,
    {
      ...process.env,
      HELM_CACHE_HOME: `${env.runDir}/helm/cache`,
      HELM_CONFIG_HOME: `${env.runDir}/helm/config`,
      HELM_DATA_HOME: `${env.runDir}/helm/data`,
    },
  );
  expect(helm.code, helm.stderr).toBe(0);
}

/**
 * A Helm release of the chart (operator replicas 0) in a new namespace `releaseNs`, and the
 * operator run here under the release's ServiceAccount, leading, watching `namespaces`,
 * each of which is created with a bound `weights` volume.
 */
export async function operatorForNamespaces(o: {
  release: string;
  releaseNs: string;
  identity: string;
  namespaces: string[];
  args?: string[];
}): Promise<RunningOperator> {
  await helmInstall(o.release, o.releaseNs);
  const op = await startOperator({
    kubeconfig: await serviceAccountKubeconfig(o.releaseNs, o.release),
    identity: o.identity,
    leaseNamespace: o.releaseNs,
    namespaces: o.namespaces,
    ...(o.args ? { args: o.args } : {}),
  });
  await waitForLeadership(op);
  for (const ns of o.namespaces) {
    await core().createNamespace({ body: { metadata: { name: ns } } });
    await createWeightsVolume(ns);
  }
  return op;
}
