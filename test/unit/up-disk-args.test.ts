// `up`'s prefix cache flags (src/local/run.ts localDiskArgs, localNatsArgs): one gateway
// has the disk tier's folder to itself; several share it (--prefix-cache-disk-shared), unless
// they share a NATS tier, when each has a folder of its own under it; nats-server runs with
// JetStream only when the manifest keeps the prefix cache's blocks on it, and up says that
// this server stands in for spec.nats (whose Secrets it cannot use).
import { describe, expect, it } from "vitest";
import {
  localDiskArgs,
  localGatewayArgs,
  localNatsArgs,
  localNatsNote,
} from "../../src/local/run.ts";
import { tinyManifestWith } from "../support/manifest.ts";

const manifestWith = tinyManifestWith;

const manifest = (kvCache: string) => manifestWith(`  gateway:\n    kvCache: ${kvCache}`);

describe("up's prefix cache flags", () => {
  it.each([
    ["no disk tier", "{}", false, []],
    [
      "one gateway",
      "{ diskBytes: 1048576 }",
      false,
      ["--prefix-cache-disk=/c", "--prefix-cache-disk-bytes=1048576"],
    ],
    [
      "several gateways: one folder, shared",
      "{ diskBytes: 1048576 }",
      true,
      ["--prefix-cache-disk=/c", "--prefix-cache-disk-bytes=1048576", "--prefix-cache-disk-shared"],
    ],
    [
      "several gateways over a NATS tier: a folder each",
      "{ diskBytes: 1048576, remoteBytes: 4194304 }",
      true,
      ["--prefix-cache-disk=/c/gateway-2", "--prefix-cache-disk-bytes=1048576"],
    ],
    [
      "one gateway over a NATS tier",
      "{ diskBytes: 1048576, remoteBytes: 4194304 }",
      false,
      ["--prefix-cache-disk=/c", "--prefix-cache-disk-bytes=1048576"],
    ],
  ])("%s", (_name, kvCache, several, want) => {
    expect(localDiskArgs(manifest(kvCache), "/c", 2, several)).toEqual(want);
  });

  it("gives the gateway and each prefill gateway a folder of its own with disaggregated prefill", () => {
    const m = manifestWith(`  gateway:
    kvCache: { diskBytes: 1048576, remoteBytes: 4194304 }
    disaggregation: { replicas: 2 }`);
    expect(localDiskArgs(m, "/c", 0, false)).toEqual([
      "--prefix-cache-disk=/c/gateway-0",
      "--prefix-cache-disk-bytes=1048576",
    ]);
    expect(localDiskArgs(m, "/c", 1, true, "prefill")).toEqual([
      "--prefix-cache-disk=/c/prefill-1",
      "--prefix-cache-disk-bytes=1048576",
    ]);
  });

  it("starts nats-server with JetStream, stored in the folder given, only for a NATS tier", () => {
    expect(localNatsArgs(manifest("{}"), 4222, "/js")).toEqual(["-a", "127.0.0.1", "-p", "4222"]);
    expect(localNatsArgs(manifest("{ remoteBytes: 4194304 }"), 4222, "/js")).toEqual([
      "-a",
      "127.0.0.1",
      "-p",
      "4222",
      "-js",
      "-sd",
      "/js",
    ]);
  });

  it.each([
    [
      "the default URL",
      "{}",
      "nats-server on nats://127.0.0.1:5 (in place of spec.nats.url, nats://nats.expertmesh-system.svc:4222)",
    ],
    [
      "a user and TLS",
      "{ url: 'tls://nats.ops.svc:4222', userSecret: { name: u }, tls: { caSecret: { name: ca } } }",
      "nats-server on nats://127.0.0.1:5 (in place of spec.nats.url, tls://nats.ops.svc:4222; spec.nats.userSecret, tls (Kubernetes Secrets) unused: it takes no credentials and speaks plain text on loopback)",
    ],
    [
      "a bucket of 3 copies (up runs one server)",
      "{}\n  gateway: { kvCache: { remoteBytes: 1048576, remoteReplicas: 3 } }",
      "nats-server on nats://127.0.0.1:5 (in place of spec.nats.url, nats://nats.expertmesh-system.svc:4222; one server: the prefix cache's bucket in one copy, not spec.gateway.kvCache.remoteReplicas's 3)",
    ],
    [
      "an NKEY",
      "{ nkeySecret: { name: k } }",
      "nats-server on nats://127.0.0.1:5 (in place of spec.nats.url, nats://nats.expertmesh-system.svc:4222; spec.nats.nkeySecret (Kubernetes Secrets) unused: it takes no credentials and speaks plain text on loopback)",
    ],
  ])("says its nats-server stands in for spec.nats: %s", (_name, nats, want) => {
    expect(localNatsNote(manifestWith(`  nats: ${nats}`), "nats://127.0.0.1:5")).toBe(want);
  });

  it("passes the gateways the bucket in one copy: up runs one nats-server", () => {
    const m = manifestWith("  gateway: { kvCache: { remoteBytes: 1048576, remoteReplicas: 3 } }");
    const args = localGatewayArgs(m, "gateway");
    expect(args).toContain("--prefix-cache-remote-bytes=1048576");
    expect(args.join(" ")).not.toContain("--prefix-cache-remote-replicas");
  });
});
