// Autoscaler.stop with a connection to a model's NATS still being made (a server that does
// not answer): it returns within its one-second wait, so that the operator releases its lease
// in time, and closes the connection once it is made. The connect is the autoscaler's own
// injection point (AutoscalerOptions.connect): a real NATS server cannot be made to hang
// a connect at will.
import { readFileSync } from "node:fs";
import type { NatsConnection } from "@nats-io/transport-node";
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import { Autoscaler } from "../../src/operator/autoscale/autoscaler.ts";

describe("Autoscaler.stop", () => {
  it("does not wait past a second for a NATS connection still being made, and closes it once made", async () => {
    let made: (nc: NatsConnection) => void = () => {};
    const connecting = new Promise<NatsConnection>((r) => {
      made = r;
    });
    let closed = 0;
    const a = new Autoscaler({
      registry: new Registry(),
      requeue: () => {},
      event: () => {},
      log: () => {},
      connect: () => connecting,
    });
    const model = parseManifest(
      readFileSync(new URL("../../examples/tiny.yaml", import.meta.url), "utf8"),
      "tiny.yaml",
    );
    model.spec.autoscaling.enabled = true;
    a.observe("default/tiny", model, { plan: undefined, replicas: new Map(), ready: new Map() });
    // Without the bound it would wait for the connect forever (this one never ends by itself).
    const outcome = await Promise.race([
      a.stop().then(() => "stopped"),
      new Promise((r) => setTimeout(() => r("still waiting"), 5000)),
    ]);
    expect(outcome).toBe("stopped");
    made({ close: async () => void closed++ } as unknown as NatsConnection);
    await new Promise((r) => setTimeout(r, 10));
    expect(closed).toBe(1);
  });
});
