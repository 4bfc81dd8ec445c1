// The leader elector's release racing a renewal, over an in-memory Lease with the API
// server's optimistic concurrency (a replace names the resourceVersion it read; another
// one is 409). The real API server is in test/operator/operator.test.ts (leader election
// between two operator processes); the race needs a read held in flight, which only a fake
// can hold at will.
import type { V1Lease } from "@kubernetes/client-node";
import { describe, expect, it } from "vitest";
import { LeaderElector, type LeaseApi } from "../../src/operator/leader.ts";

class MemoryLeases implements LeaseApi {
  lease: V1Lease | null = null;
  #version = 0;
  /** When set, the next read waits for release(), and reads the lease then. */
  holdNextRead = false;
  #held: (() => void) | null = null;
  readonly heldRead: Promise<void>;
  #onHeld!: () => void;

  constructor() {
    this.heldRead = new Promise((r) => {
      this.#onHeld = r;
    });
  }

  release(): void {
    this.#held?.();
  }

  async readNamespacedLease(): Promise<V1Lease> {
    if (this.holdNextRead) {
      this.holdNextRead = false;
      await new Promise<void>((r) => {
        this.#held = r;
        this.#onHeld();
      });
    }
    if (!this.lease) throw Object.assign(new Error("not found"), { code: 404 });
    return structuredClone(this.lease);
  }

  async createNamespacedLease(p: { body: V1Lease }): Promise<V1Lease> {
    if (this.lease) throw Object.assign(new Error("exists"), { code: 409 });
    this.lease = {
      ...p.body,
      metadata: { ...p.body.metadata, resourceVersion: `${++this.#version}` },
    };
    return this.lease;
  }

  async replaceNamespacedLease(p: { body: V1Lease }): Promise<V1Lease> {
    if (p.body.metadata?.resourceVersion !== this.lease?.metadata?.resourceVersion)
      throw Object.assign(new Error("conflict"), { code: 409 });
    this.lease = {
      ...p.body,
      metadata: { ...p.body.metadata, resourceVersion: `${++this.#version}` },
    };
    return this.lease;
  }
}

describe("LeaderElector.release", () => {
  it("a renewal in flight when the leader releases cannot take the lease back", async () => {
    const api = new MemoryLeases();
    const e = new LeaderElector(api as unknown as LeaseApi, {
      namespace: "ns",
      name: "lease",
      identity: "me",
      retryPeriodMs: 10,
    });
    await e.acquire(() => {});
    expect(api.lease?.spec?.holderIdentity).toBe("me");
    // The next renewal's read reaches the server only after the release below has written.
    api.holdNextRead = true;
    await api.heldRead;
    const released = e.release();
    await new Promise((r) => setTimeout(r, 20));
    api.release();
    await released;
    await new Promise((r) => setTimeout(r, 50)); // any renewal left would have written by now
    expect(api.lease?.spec?.holderIdentity).toBe("");
    expect(e.isLeader).toBe(false);
  });
});
