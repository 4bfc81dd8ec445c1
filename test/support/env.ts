// What tests use to reach the real services started by the global setup.
import { mkdtempSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { KubeConfig } from "@kubernetes/client-node";
import { inject } from "vitest";
import type { TestEnvInfo } from "../env/environment.ts";
import { type NatsServer, startNats } from "../env/nats.ts";

/** Connection info of this run's nats-server and control plane. */
export function testEnv(): TestEnvInfo {
  return inject("testEnv");
}

/**
 * A nats-server of the test's own without JetStream (as some clusters run), its log in the
 * run's logs/<name>.log; the caller stops it.
 */
export function startNatsWithoutJetStream(name: string): Promise<NatsServer> {
  const dir = mkdtempSync(join(testEnv().runDir, `${name}-`));
  return startNats(testEnv().binaries.natsServer, dir, join(testEnv().runDir, "logs"), {
    name,
    jetStream: false,
  });
}

/** A KubeConfig for the admin identity (system:masters). */
export function adminKubeConfig(): KubeConfig {
  const kc = new KubeConfig();
  kc.loadFromFile(testEnv().kube.kubeconfig);
  return kc;
}

/** A KubeConfig that authenticates with `token` (e.g. a ServiceAccount token). */
export function tokenKubeConfig(token: string, user = "token-user"): KubeConfig {
  const { server, caCert } = testEnv().kube;
  const kc = new KubeConfig();
  kc.loadFromOptions({
    clusters: [
      {
        name: "test",
        server,
        caData: readFileSync(caCert).toString("base64"),
        skipTLSVerify: false,
      },
    ],
    users: [{ name: user, token }],
    contexts: [{ name: "ctx", cluster: "test", user }],
    currentContext: "ctx",
  });
  return kc;
}

/** A namespace name unique to this test run. */
export function uniqueName(prefix: string): string {
  return `${prefix}-${Date.now().toString(36)}-${Math.floor(Math.random() * 1e6).toString(36)}`;
}

/**
 * Polls `probe` until it returns a value other than undefined; fails with `what` and the
 * last error after `timeoutMs`.
 */
export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  timeoutMs = 60_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    await sleep(250);
  }
  throw new Error(
    `timed out after ${timeoutMs} ms waiting for ${what}${last instanceof Error ? `: ${last.message}` : ""}`,
  );
}
