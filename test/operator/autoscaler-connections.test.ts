// The autoscaler's connections to the models' NATS servers, counted by a real nats-server of
// the test's own (/connz): models on the same server with the same auth share one, and one
// that no model uses any more (the model deleted, its autoscaling off, its spec.nats or its
// Secrets changed) is closed instead of staying open for the operator's life.
import { readFileSync } from "node:fs";
import { Registry } from "prom-client";
import { afterAll, beforeAll, describe, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { Autoscaler } from "../../src/operator/autoscale/autoscaler.ts";
import type { NatsServer } from "../env/nats.ts";
import { startNatsWithoutJetStream, waitFor } from "../support/env.ts";

let server: NatsServer;
beforeAll(async () => {
  server = await startNatsWithoutJetStream("nats-autoscaler-connections");
});
afterAll(async () => {
  await server?.process.stop();
});

/** The operator's connections the server holds. */
async function operatorConnections(): Promise<number> {
  const connz = (await (await fetch(`${server.info.monitorUrl}/connz`)).json()) as {
    connections?: { name?: string }[];
  };
  return (connz.connections ?? []).filter((c) => c.name === "expertmesh-operator").length;
}

const until = (n: number) =>
  waitFor(`${n} operator connection(s)`, async () =>
    (await operatorConnections()) === n ? true : undefined,
  );

function model(name: string, url: string, autoscaling = true) {
  const m = parseManifest(
    readFileSync(new URL("../../examples/tiny.yaml", import.meta.url), "utf8"),
    "tiny.yaml",
  );
  m.metadata.name = name;
  m.spec.nats.url = url;
  m.spec.autoscaling.enabled = autoscaling;
  return m;
}

describe("the autoscaler's NATS connections", () => {
  it("one per server and auth, closed once no model uses it", async () => {
    const a = new Autoscaler({
      registry: new Registry(),
      requeue: () => {},
      event: () => {},
      log: () => {},
    });
    const view = { plan: undefined, replicas: new Map(), ready: new Map() };
    const byIp = server.info.url;
    const byName = byIp.replace("127.0.0.1", "localhost");
    try {
      a.observe("default/a", model("a", byIp), view);
      a.observe("default/b", model("b", byIp), view);
      await until(1);
      // a's spec.nats changes (a new URL; new credentials or certificates do the same): a
      // connection of its own; b keeps the first.
      a.observe("default/a", model("a", byName), view);
      await until(2);
      // b deleted: nobody uses the first connection, which is closed.
      a.forget("default/b");
      await until(1);
      // a's autoscaling turned off: its connection goes too.
      a.observe("default/a", model("a", byName, false), view);
      await until(0);
    } finally {
      await a.stop();
    }
  });
});
