// What up's gateways read of the -f files' Secrets (src/local/gateway-secrets.ts, ADR 0043):
// the values, the files in the run folder, and what an edit of the -f files does while up
// runs. up itself, rotating a key under --watch, is tested in test/local/up.test.ts.
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  envChanges,
  envFromObjects,
  gatewaySecrets,
  gatewaySecretsNotes,
  type SecretsRead,
  secretsEdit,
  writeGatewaySecretFiles,
} from "../../src/local/gateway-secrets.ts";
import { LocalObjects } from "../../src/local/objects.ts";
import { tinyManifestWith } from "../support/manifest.ts";

const m = tinyManifestWith(`  gateway:
    apiKeySecret: { name: keys }
    tls: { secretName: cert, clientCASecret: { name: ca, key: ca.crt } }
  env:
    - { name: FROM_SECRET, valueFrom: { secretKeyRef: { name: env, key: v } } }
    - { name: LITERAL, value: x }`);

/** The objects of a -f file holding these Secrets (stringData); undefined leaves one out. */
function objects(o: {
  keys?: string;
  cert?: [string, string];
  ca?: string;
  env?: string;
}): LocalObjects {
  const docs: string[] = [];
  const secret = (name: string, data: Record<string, string>) =>
    docs.push(`kind: Secret\nmetadata: { name: ${name} }\nstringData: ${JSON.stringify(data)}`);
  if (o.keys !== undefined) secret("keys", { "api-keys": o.keys });
  if (o.cert) secret("cert", { "tls.crt": o.cert[0], "tls.key": o.cert[1] });
  if (o.ca !== undefined) secret("ca", { "ca.crt": o.ca });
  if (o.env !== undefined) secret("env", { v: o.env });
  const objs = new LocalObjects();
  objs.add(docs.join("\n---\n"), "s.yaml", "default");
  return objs;
}
const read = (o: Parameters<typeof objects>[0]): SecretsRead => ({
  gateway: gatewaySecrets(m, objects(o)),
});
const envOf = (o: Parameters<typeof objects>[0]) => envFromObjects(m, objects(o));
const all = { keys: "k1", cert: ["C1", "K1"] as [string, string], ca: "CA1", env: "e1" };

describe("gatewaySecrets", () => {
  it("takes the keys, and the certificate only with every part it names", () => {
    expect(read(all).gateway).toEqual({
      apiKeys: { value: "k1", source: "s.yaml" },
      tls: {
        cert: { value: "C1", source: "s.yaml" },
        key: { value: "K1", source: "s.yaml" },
        ca: { value: "CA1", source: "s.yaml" },
      },
    });
    expect(read({ keys: "k1", cert: ["C1", "K1"] }).gateway.tls).toBeUndefined();
    expect(read({}).gateway).toEqual({});
    expect([...envOf(all)]).toEqual([["FROM_SECRET", { value: "e1", source: "s.yaml" }]]);
  });

  it("refuses an API keys Secret that holds no key (EM_GATEWAY_API_KEYS), never serving open", () => {
    expect(() => read({ keys: " , " })).toThrow(
      expect.objectContaining({
        code: "EM_GATEWAY_API_KEYS",
        message: expect.stringContaining("the Secret keys's api-keys in s.yaml holds no API key"),
      }),
    );
  });

  it("says where each came from, or what stands in", () => {
    expect(gatewaySecretsNotes(m, read(all).gateway, false)).toEqual([
      "spec.gateway.apiKeySecret: the gateways take their keys from s.yaml",
      "spec.gateway.tls: the gateways serve TLS with the certificate in s.yaml, requiring client certificates its CA signed (s.yaml)",
    ]);
    const notes = gatewaySecretsNotes(m, {}, true);
    expect(notes[0]).toContain("takes its keys from $EM_API_KEYS here");
    expect(notes[1]).toContain("serve plain HTTP and gRPC here");
    expect(gatewaySecretsNotes(m, {}, false)[0]).toContain("the gateway is open");
    expect(gatewaySecretsNotes(tinyManifestWith(), {}, false)).toEqual([]);
  });
});

describe("writeGatewaySecretFiles", () => {
  it("writes each file 0600 (no temporary left) and names them in the gateway's flags", () => {
    const dir = mkdtempSync(join(tmpdir(), "em-gwsecrets-"));
    try {
      const args = writeGatewaySecretFiles(dir, read(all).gateway);
      expect(args).toEqual([
        `--api-keys-file=${join(dir, "api-keys")}`,
        `--tls-cert=${join(dir, "tls.crt")}`,
        `--tls-key=${join(dir, "tls.key")}`,
        `--tls-client-ca=${join(dir, "client-ca.crt")}`,
      ]);
      expect(readdirSync(dir).sort()).toEqual(["api-keys", "client-ca.crt", "tls.crt", "tls.key"]);
      for (const f of readdirSync(dir)) expect(statSync(join(dir, f)).mode & 0o777).toBe(0o600);
      expect(readFileSync(join(dir, "tls.key"), "utf8")).toBe("K1");
      expect(writeGatewaySecretFiles(dir, {})).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("secretsEdit", () => {
  const running = read(all);
  it.each([
    ["nothing changed", all, false, []],
    [
      "new keys",
      { ...all, keys: "k2\nk3" },
      true,
      [
        "spec.gateway.apiKeySecret changed in s.yaml: the gateways take its 2 key(s) without a restart",
      ],
    ],
    [
      "a new certificate",
      { ...all, cert: ["C2", "K2"] as [string, string] },
      true,
      [
        "spec.gateway.tls changed in s.yaml: the gateways take the new certificate without a restart",
      ],
    ],
    [
      "a new client CA",
      { ...all, ca: "CA2" },
      true,
      [
        "spec.gateway.tls changed in s.yaml: the gateways take the new certificate without a restart",
      ],
    ],
    [
      "the keys Secret gone",
      { cert: all.cert, ca: all.ca, env: all.env },
      false,
      [
        "spec.gateway.apiKeySecret: no -f file holds keys's api-keys now; the gateways keep the keys they have",
      ],
    ],
    [
      "the client CA gone",
      { keys: all.keys, cert: all.cert, env: all.env },
      false,
      [
        "spec.gateway.tls: the -f files no longer hold all of its Secrets; the gateways keep the certificate they have",
      ],
    ],
    ["spec.env's Secret changed (envChanges' business)", { ...all, env: "e2" }, false, []],
  ])("%s", (_, edited, write, starts) => {
    const edit = secretsEdit(m, running, read(edited));
    expect(edit.write).toBe(write);
    expect(edit.notes.length).toBe(starts.length);
    edit.notes.forEach((n, i) => {
      expect(n.startsWith(starts[i]!), n).toBe(true);
    });
  });

  it("keeps what runs: the edited keys once written", () => {
    const once = secretsEdit(m, running, read({ ...all, keys: "k2" }));
    expect(once.running.gateway.apiKeys?.value).toBe("k2");
    // Nothing new: nothing to say.
    expect(secretsEdit(m, once.running, read({ ...all, keys: "k2" })).notes).toEqual([]);
  });

  it("Secrets that were not there at start need a restart", () => {
    const bare = read({});
    const notes = secretsEdit(m, bare, read(all)).notes;
    expect(notes).toHaveLength(2);
    expect(notes[0]).toContain("the gateways started without keys: stop and start up");
    expect(notes[1]).toContain(
      "started serving plain HTTP and gRPC: stop and start up to serve TLS",
    );
    expect(secretsEdit(m, bare, read(all)).write).toBe(false);
  });
});

describe("envChanges", () => {
  it.each<[string, string | undefined, string | undefined, string[], string[]]>([
    ["the same value", "e1", "e1", [], []],
    ["a new value", "e1", "e2", ["spec.env's FROM_SECRET: its value in s.yaml changed"], []],
    [
      "held now, not at start",
      undefined,
      "e1",
      ["spec.env's FROM_SECRET: s.yaml holds it now"],
      [],
    ],
    [
      "held at start, not now",
      "e1",
      undefined,
      [],
      [
        "spec.env's FROM_SECRET: no -f file holds its Secret or ConfigMap now; the processes keep the value they have",
      ],
    ],
    ["held neither time", undefined, undefined, [], []],
  ])("%s", (_, before, after, changed, kept) => {
    expect(envChanges(m, envOf({ env: before }), envOf({ env: after }))).toEqual({ changed, kept });
  });

  it("reads only spec.env's variables: a value a manifest without them names is no change", () => {
    const bare = tinyManifestWith("");
    expect(envChanges(bare, envOf({ env: "e1" }), envOf({ env: "e2" }))).toEqual({
      changed: [],
      kept: [],
    });
  });
});
