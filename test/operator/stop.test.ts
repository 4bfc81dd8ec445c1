// The operator's stop when a Kubernetes call hangs: a real admission webhook (served by this
// test, called by the real kube-apiserver) holds the operator's apply of a Deployment without
// answering, as a stuck webhook or a hung apiserver connection does. SIGTERM must still hand
// back the lease within --shutdown-timeout, not wait for the held call (nor for an idle
// connection to its metrics port).

import { readFileSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer, type Server } from "node:https";
import { connect } from "node:net";
import { dirname, join } from "node:path";
import {
  AdmissionregistrationV1Api,
  CoordinationV1Api,
  CustomObjectsApi,
} from "@kubernetes/client-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { adminKubeConfig, testEnv, uniqueName, waitFor } from "../support/env.ts";
import { model, operatorForNamespaces, type RunningOperator } from "../support/operator.ts";

const G = { group: "expertmesh.io", version: "v1alpha1", plural: "deepseekmodels" };
const kc = adminKubeConfig();
const admission = kc.makeApiClient(AdmissionregistrationV1Api);
const coordination = kc.makeApiClient(CoordinationV1Api);
const custom = kc.makeApiClient(CustomObjectsApi);

describe("operator stop with a reconcile stuck in a Kubernetes call", () => {
  const ns = uniqueName("em-stop");
  const releaseNs = uniqueName("em-stop-system");
  const name = uniqueName("held");
  const webhookName = `${name}.hold.expertmesh.io`;
  /** Admission requests the webhook is holding, and whether each is still open. */
  const held: { res: ServerResponse; closed: boolean }[] = [];
  let server: Server;
  let op: RunningOperator;

  beforeAll(async () => {
    // The control plane's serving certificate is for 127.0.0.1; its CA is the webhook's bundle.
    const pki = dirname(testEnv().kube.caCert);
    server = createServer(
      { cert: readFileSync(join(pki, "serving.crt")), key: readFileSync(join(pki, "serving.key")) },
      (req: IncomingMessage, res: ServerResponse) => {
        const entry = { res, closed: false };
        res.on("close", () => {
          entry.closed = true;
        });
        req.resume(); // read the AdmissionReview, and never answer it
        held.push(entry);
      },
    );
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as { port: number }).port;
    await admission.createValidatingWebhookConfiguration({
      body: {
        metadata: { name: webhookName },
        webhooks: [
          {
            name: webhookName,
            clientConfig: {
              url: `https://127.0.0.1:${port}/hold`,
              caBundle: readFileSync(testEnv().kube.caCert).toString("base64"),
            },
            rules: [
              {
                apiGroups: ["apps"],
                apiVersions: ["v1"],
                operations: ["CREATE", "UPDATE"],
                resources: ["deployments"],
              },
            ],
            // Only this model's Deployments: nothing else in the cluster is held.
            objectSelector: { matchLabels: { "expertmesh.io/model": name } },
            failurePolicy: "Fail",
            sideEffects: "None",
            admissionReviewVersions: ["v1"],
            timeoutSeconds: 30,
          },
        ],
      },
    });
    op = await operatorForNamespaces({
      release: "expertmesh-stop",
      releaseNs,
      identity: "op-stop",
      namespaces: [ns],
      args: ["--shutdown-timeout=2"],
    });
  });

  afterAll(async () => {
    await op?.process.stop(1000);
    await admission
      .deleteValidatingWebhookConfiguration({ name: webhookName })
      .catch(() => undefined);
    for (const h of held) h.res.destroy();
    server?.close();
  });

  it("hands back the lease and exits after --shutdown-timeout, with the apply still held", async () => {
    await custom.createNamespacedCustomObject({ ...G, namespace: ns, body: model(name, ns) });
    await waitFor(
      "the operator's Deployment apply held by the webhook",
      async () => held.some((h) => !h.closed) || undefined,
    );
    const lease = await coordination.readNamespacedLease({
      name: "expertmesh-operator",
      namespace: releaseNs,
    });
    expect(lease.spec?.holderIdentity).toBe("op-stop");

    // And a connection to its metrics port that never sent a byte (a scraper's preconnect):
    // closing the metrics server waited for it (Node's 60 s headers timeout) before.
    const { port } = new URL(op.metricsUrl);
    const idle = connect(Number(port), "127.0.0.1");
    idle.on("error", () => {});
    await new Promise<void>((r) => idle.once("connect", () => r()));

    // SIGKILL comes 25 s after SIGTERM: without the bound, stop waits for the apiserver's
    // 30 s webhook timeout, is killed first (no exit code 0), and leaves the lease held.
    await op.process.stop(25_000);
    idle.destroy();
    expect(op.process.child.exitCode).toBe(0);
    expect(op.log()).toMatch(/reconcile of .*held.* still running after 2 s/);
    expect(op.log()).toContain("released the lease");
    const after = await coordination.readNamespacedLease({
      name: "expertmesh-operator",
      namespace: releaseNs,
    });
    expect(after.spec?.holderIdentity ?? "").toBe("");
  });
});
