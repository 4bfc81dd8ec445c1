// Runs `expertmesh operator` as a real process against the test control plane, under the
// Helm chart's ServiceAccount (a token from the TokenRequest API), never as admin.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { CoreV1Api } from "@kubernetes/client-node";
import { writeKubeconfig } from "../env/pki.ts";
import { ManagedProcess } from "../env/process.ts";
import { adminKubeConfig, testEnv } from "./env.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));

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
