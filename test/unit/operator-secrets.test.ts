// What the operator checks of the Secrets a model names before it applies anything
// (src/operator/secrets.ts): which Secrets and keys, SecretNotFound and SecretKeyMissing,
// the NATS auth of its own connection with NATSAuthInvalid and NATSTLSInvalid, and the gateway's
// serving certificate and client CA with GatewayTLSInvalid, its API keys with GatewayAPIKeysInvalid. The reconciler's reads are
// tested against the real API server in test/operator/operator.test.ts.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nkeys } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseManifest } from "../../src/api/manifest.ts";
import {
  configMapProblems,
  envRefs,
  envSourcesHash,
  gatewayApiKeysProblems,
  gatewayTlsProblems,
  natsAuthOf,
  referencedSecrets,
  type SecretContents,
  secretProblems,
} from "../../src/operator/secrets.ts";
import { makeNatsJwtAuth } from "../env/nats-jwt.ts";
import { makeNatsPki } from "../env/pki.ts";

function model(spec: string) {
  return parseManifest(`
apiVersion: expertmesh.io/v1alpha1
kind: DeepSeekModel
metadata: { name: m, namespace: ns, uid: u-1 }
spec:
  model:
    preset: tiny-v3
${spec}`);
}

const everything = model(`    source:
      huggingFace: { repo: deepseek-ai/DeepSeek-V3, tokenSecret: { name: hf } }
  nats:
    url: nats://nats:4222
    credentialsSecret: { name: creds }
    tls: { caSecret: { name: pki }, clientSecret: { name: pki } }
  gateway:
    apiKeySecret: { name: keys, key: list }
    tls: { secretName: gw-cert, clientCASecret: { name: clients } }`);

const b = (s: string | Uint8Array) => Buffer.from(s);
const creds = makeNatsJwtAuth().user("alice");
const seedText = new TextDecoder().decode(nkeys.createUser().getSeed());
let dir: string;
let pem: { ca: string; cert: string; key: string };

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "em-secrets-"));
  const pki = makeNatsPki(dir);
  const read = (p: string) => readFileSync(p, "utf8");
  pem = { ca: read(pki.ca), cert: read(pki.client.cert), key: read(pki.client.key) };
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("referencedSecrets", () => {
  it("names every Secret the pods read, with its keys; none for a model without any", () => {
    expect(referencedSecrets(everything)).toEqual([
      { field: "spec.model.source.huggingFace.tokenSecret", name: "hf", keys: ["token"] },
      { field: "spec.nats.credentialsSecret", name: "creds", keys: ["nats.creds"] },
      { field: "spec.nats.tls.caSecret", name: "pki", keys: ["ca.crt"] },
      { field: "spec.nats.tls.clientSecret", name: "pki", keys: ["tls.crt", "tls.key"] },
      { field: "spec.gateway.apiKeySecret", name: "keys", keys: ["list"] },
      { field: "spec.gateway.tls.secretName", name: "gw-cert", keys: ["tls.crt", "tls.key"] },
      { field: "spec.gateway.tls.clientCASecret", name: "clients", keys: ["ca.crt"] },
    ]);
    expect(referencedSecrets(model("    source: { pvc: { claimName: w } }"))).toEqual([]);
    const nats = (fields: string) =>
      referencedSecrets(model(`    source: { pvc: { claimName: w } }\n  nats: { ${fields} }`));
    expect(nats("userSecret: { name: u }")).toEqual([
      { field: "spec.nats.userSecret", name: "u", keys: ["username", "password"] },
    ]);
    expect(nats("tokenSecret: { name: t }")).toEqual([
      { field: "spec.nats.tokenSecret", name: "t", keys: ["token"] },
    ]);
    expect(nats("nkeySecret: { name: n, key: user.nk }")).toEqual([
      { field: "spec.nats.nkeySecret", name: "n", keys: ["user.nk"] },
    ]);
  });
});

describe("secretProblems", () => {
  const refs = referencedSecrets(everything);
  const full = (): Map<string, Record<string, Buffer> | null> =>
    new Map<string, Record<string, Buffer> | null>([
      ["hf", { token: b("hf_x") }],
      ["creds", { "nats.creds": b("c") }],
      ["pki", { "ca.crt": b("a"), "tls.crt": b("c"), "tls.key": b("k") }],
      ["keys", { list: b("k1,k2") }],
      ["gw-cert", { "tls.crt": b("c"), "tls.key": b("k") }],
    ]);
  it.each<[string, (c: Map<string, Record<string, Buffer> | null>) => void, string[]]>([
    ["all there (one cert-manager Secret for the CA and the pair)", () => {}, []],
    [
      "a Secret that is not there, named once per field that reads it",
      (c) => c.set("pki", null),
      [
        "SecretNotFound: Secret ns/pki (spec.nats.tls.caSecret) does not exist",
        "SecretNotFound: Secret ns/pki (spec.nats.tls.clientSecret) does not exist",
      ],
    ],
    [
      "a key the pods read is missing",
      (c) => c.set("keys", { keys: b("k") }),
      ["SecretKeyMissing: Secret ns/keys (spec.gateway.apiKeySecret) has no key list"],
    ],
    [
      "the gateway's serving Secret without its key",
      (c) => c.set("gw-cert", { "tls.crt": b("c") }),
      ["SecretKeyMissing: Secret ns/gw-cert (spec.gateway.tls.secretName) has no key tls.key"],
    ],
    [
      "half of a client pair",
      (c) => c.set("pki", { "ca.crt": b("a"), "tls.crt": b("c") }),
      ["SecretKeyMissing: Secret ns/pki (spec.nats.tls.clientSecret) has no key tls.key"],
    ],
    [
      "an empty Secret",
      (c) => c.set("hf", {}),
      [
        "SecretKeyMissing: Secret ns/hf (spec.model.source.huggingFace.tokenSecret) has no key token",
      ],
    ],
    ["a Secret not read: nothing known, nothing said", (c) => c.delete("creds"), []],
  ])("%s", (_, change, want) => {
    const contents = full();
    change(contents);
    expect(secretProblems("ns", refs, contents).map((p) => `${p.reason}: ${p.message}`)).toEqual(
      want,
    );
  });
});

describe("natsAuthOf", () => {
  const tlsModel = (tls: string) =>
    model(`    source: { pvc: { claimName: w } }
  nats: { url: "nats://nats:4222", credentialsSecret: { name: creds }, tls: ${tls} }`);
  it("builds the operator's NATS auth from what is there; parts not there are left out", () => {
    const m = tlsModel("{ caSecret: { name: ca }, clientSecret: { name: client } }");
    const contents: SecretContents = new Map<string, Record<string, Buffer>>([
      ["creds", { "nats.creds": b(creds) }],
      ["ca", { "ca.crt": b(pem.ca) }],
      ["client", { "tls.crt": b(pem.cert), "tls.key": b(pem.key) }],
    ]);
    const { auth, problems } = natsAuthOf(m, contents);
    expect(problems).toEqual([]);
    expect(auth!.identity).toEqual({ kind: "creds", creds: b(creds) });
    expect(auth!.tls).toEqual({ ca: pem.ca, cert: pem.cert, key: pem.key });
    // The client Secret missing: TLS with the CA alone (its absence is secretProblems').
    const partial = natsAuthOf(
      m,
      new Map<string, Record<string, Buffer>>([["ca", { "ca.crt": b(pem.ca) }]]),
    );
    expect(partial.problems).toEqual([]);
    expect(partial.auth).toEqual({ tls: { ca: pem.ca } });
    // tls: {} asks for TLS with the public roots.
    expect(natsAuthOf(tlsModel("{}"), new Map())).toEqual({ auth: { tls: {} }, problems: [] });
    // No credentials, no TLS: no auth at all.
    const plain = model("    source: { pvc: { claimName: w } }");
    expect(natsAuthOf(plain, new Map())).toEqual({ problems: [] });
  });

  it.each<[string, Record<string, Record<string, Buffer>>, RegExp]>([
    [
      "a CA that is no certificate",
      { ca: { "ca.crt": b("nope") } },
      /^Secret ns\/ca's ca\.crt \(spec\.nats\.tls\.caSecret\) holds no PEM certificate/,
    ],
    [
      "an empty client certificate",
      { client: { "tls.crt": b(""), "tls.key": b("") } },
      /^Secret ns\/client's tls\.crt \(spec\.nats\.tls\.clientSecret\) holds no PEM certificate/,
    ],
  ])("reports %s as NATSTLSInvalid", (_, contents, message) => {
    const m = tlsModel("{ caSecret: { name: ca }, clientSecret: { name: client } }");
    const { problems } = natsAuthOf(m, new Map(Object.entries(contents)));
    expect(problems.map((p) => p.reason)).toEqual(["NATSTLSInvalid"]);
    expect(problems[0]!.message).toMatch(message);
  });

  it("reports a client key of another certificate as NATSTLSInvalid", () => {
    const other = readFileSync(join(dir, "nats-server.key"), "utf8");
    const m = tlsModel("{ clientSecret: { name: client } }");
    const { problems } = natsAuthOf(
      m,
      new Map([["client", { "tls.crt": b(pem.cert), "tls.key": b(other) }]]),
    );
    expect(problems).toEqual([
      {
        reason: "NATSTLSInvalid",
        message:
          "Secret ns/client's tls.key (spec.nats.tls.clientSecret) is not the key of Secret ns/client's tls.crt (spec.nats.tls.clientSecret) (CN=expertmesh)",
      },
    ]);
  });
  const authModel = (nats: string) =>
    model(`    source: { pvc: { claimName: w } }\n  nats: { url: "nats://nats:4222", ${nats} }`);
  it.each<[string, string, Record<string, Record<string, Buffer>>, unknown]>([
    [
      "a user and password (line ends dropped)",
      "userSecret: { name: u }",
      { u: { username: b("alice\n"), password: b("s3cret\n") } },
      { kind: "user", user: "alice", password: "s3cret" },
    ],
    [
      "a token",
      "tokenSecret: { name: t }",
      { t: { token: b("tok") } },
      { kind: "token", token: "tok" },
    ],
    [
      "an NKEY seed",
      "nkeySecret: { name: n }",
      { n: { seed: b(seedText) } },
      { kind: "nkey", seed: b(seedText) },
    ],
  ])("builds the identity of %s", (_, nats, contents, identity) => {
    expect(natsAuthOf(authModel(nats), new Map(Object.entries(contents)))).toEqual({
      auth: { identity },
      problems: [],
    });
  });

  it.each<[string, string, Record<string, Record<string, Buffer>>, RegExp]>([
    [
      "an empty password",
      "userSecret: { name: u }",
      { u: { username: b("alice"), password: b("\n") } },
      /^Secret ns\/u's password \(spec\.nats\.userSecret\) is empty$/,
    ],
    [
      "a public key for a seed",
      "nkeySecret: { name: n, key: nk }",
      { n: { nk: b("UABC") } },
      /^Secret ns\/n's nk \(spec\.nats\.nkeySecret\) is not an NKEY user seed/,
    ],
    [
      "a .creds that is none",
      "credentialsSecret: { name: c }",
      { c: { "nats.creds": b("CREDS") } },
      /^Secret ns\/c's nats\.creds \(spec\.nats\.credentialsSecret\) is not a NATS \.creds file/,
    ],
  ])("reports %s as NATSAuthInvalid, and leaves the identity out", (_, nats, contents, message) => {
    const { auth, problems } = natsAuthOf(authModel(nats), new Map(Object.entries(contents)));
    expect(auth).toBeUndefined();
    expect(problems.map((p) => p.reason)).toEqual(["NATSAuthInvalid"]);
    expect(problems[0]!.message).toMatch(message);
  });

  it("leaves out an identity whose Secret is not all there (secretProblems says so)", () => {
    expect(
      natsAuthOf(authModel("userSecret: { name: u }"), new Map([["u", { username: b("a") }]])),
    ).toEqual({ problems: [] });
  });
});

describe("gatewayTlsProblems", () => {
  const servingModel = (tls: string) =>
    model(`    source: { pvc: { claimName: w } }\n  gateway: { tls: ${tls} }`);
  const mtls = servingModel("{ secretName: gw, clientCASecret: { name: clients } }");
  const otherKey = () => readFileSync(join(dir, "nats-server.key"), "utf8");
  const good = () => ({ "tls.crt": b(pem.cert), "tls.key": b(pem.key) });

  it("finds nothing wrong with a sound pair and CA bundle, or without spec.gateway.tls", () => {
    const bundle = b(pem.ca + readFileSync(join(dir, "other-ca.crt"), "utf8"));
    const contents = new Map(Object.entries({ gw: good(), clients: { "ca.crt": bundle } }));
    expect(gatewayTlsProblems(mtls, contents)).toEqual([]);
    expect(gatewayTlsProblems(servingModel("{ secretName: gw }"), contents)).toEqual([]);
    expect(gatewayTlsProblems(model("    source: { pvc: { claimName: w } }"), contents)).toEqual(
      [],
    );
    // Missing Secrets and keys are secretProblems' to report.
    expect(gatewayTlsProblems(mtls, new Map([["gw", { "tls.crt": b("x") }]]))).toEqual([]);
  });

  it.each<[string, () => Record<string, Record<string, Buffer>>, string[]]>([
    [
      "a certificate that is none",
      () => ({ gw: { "tls.crt": b("nope"), "tls.key": b(pem.key) } }),
      [
        "Secret ns/gw's tls.crt (spec.gateway.tls.secretName) holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
      ],
    ],
    [
      "a key of another certificate",
      () => ({ gw: { "tls.crt": b(pem.cert), "tls.key": b(otherKey()) } }),
      [
        "Secret ns/gw's tls.key (spec.gateway.tls.secretName) is not the key of Secret ns/gw's tls.crt (spec.gateway.tls.secretName) (CN=expertmesh)",
      ],
    ],
    [
      "a key that is none",
      () => ({ gw: { "tls.crt": b(pem.cert), "tls.key": b("garbage") } }),
      ["Secret ns/gw's tls.key (spec.gateway.tls.secretName) is not a readable PEM private key: "],
    ],
    [
      "a client CA that is a key, and a bad pair: both",
      () => ({
        gw: { "tls.crt": b(pem.cert), "tls.key": b(otherKey()) },
        clients: { "ca.crt": b(pem.key) },
      }),
      [
        "Secret ns/gw's tls.key (spec.gateway.tls.secretName) is not the key of ",
        "Secret ns/clients's ca.crt (spec.gateway.tls.clientCASecret) holds no PEM certificate",
      ],
    ],
    [
      "a CA bundle whose second certificate is cut short",
      () => ({
        gw: good(),
        clients: {
          "ca.crt": b(`${pem.ca}-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n`),
        },
      }),
      [
        "Secret ns/clients's ca.crt (spec.gateway.tls.clientCASecret) (certificate 2) is not a readable PEM certificate: ",
      ],
    ],
  ])("reports %s as GatewayTLSInvalid", (_, contents, starts) => {
    const problems = gatewayTlsProblems(mtls, new Map(Object.entries(contents())));
    expect(problems.map((p) => p.reason)).toEqual(starts.map(() => "GatewayTLSInvalid"));
    problems.forEach((p, i) => {
      expect(p.message.startsWith(starts[i]!), p.message).toBe(true);
    });
  });
});

describe("gatewayApiKeysProblems", () => {
  const keyed = model(`    source: { pvc: { claimName: w } }
  gateway:
    apiKeySecret: { name: keys, key: list }`);
  it.each([
    ["one key", "k1", []],
    ["keys over lines, blanks around", " k1 \n\n k2 ,", []],
    ["nothing", "", ["GatewayAPIKeysInvalid"]],
    ["separators and blanks alone", " , \n,\r\n ", ["GatewayAPIKeysInvalid"]],
  ])("%s: %j", (_, value, reasons) => {
    const contents = new Map([["keys", { list: Buffer.from(value) }]]);
    const problems = gatewayApiKeysProblems(keyed, contents);
    expect(problems.map((p) => p.reason)).toEqual(reasons);
    for (const p of problems)
      expect(p.message).toBe(
        "Secret ns/keys's list (spec.gateway.apiKeySecret) holds no API key: give keys separated by commas or line ends",
      );
  });

  it("leaves a missing Secret or key to secretProblems, and a model without keys alone", () => {
    expect(gatewayApiKeysProblems(keyed, new Map([["keys", null]]))).toEqual([]);
    expect(gatewayApiKeysProblems(keyed, new Map([["keys", { other: Buffer.from("") }]]))).toEqual(
      [],
    );
    expect(
      gatewayApiKeysProblems(model("    source: { pvc: { claimName: w } }"), new Map()),
    ).toEqual([]);
  });
});

describe("spec.env's Secrets and ConfigMaps", () => {
  const withEnv = model(`    source: { pvc: { claimName: weights } }
  env:
    - { name: HTTPS_PROXY, valueFrom: { secretKeyRef: { name: proxy, key: url } } }
    - { name: NO_PROXY, valueFrom: { configMapKeyRef: { name: net, key: no-proxy } } }
    - { name: HF_HUB_OFFLINE, valueFrom: { configMapKeyRef: { name: hub, key: offline, optional: true } } }
    - { name: HF_ENDPOINT, value: https://mirror }`);
  const secrets = (url: string | null): SecretContents =>
    new Map<string, Record<string, Buffer> | null>([
      ["proxy", url === null ? null : { url: b(url) }],
    ]);
  const maps = (noProxy: string | null, offline?: string): SecretContents =>
    new Map<string, Record<string, Buffer> | null>([
      ["net", noProxy === null ? null : { "no-proxy": b(noProxy) }],
      ["hub", offline === undefined ? null : { offline: b(offline) }],
    ]);

  it("are referenced, with their variable and whether optional", () => {
    expect(referencedSecrets(withEnv)).toEqual([
      { field: "spec.env[0]: HTTPS_PROXY", name: "proxy", keys: ["url"] },
    ]);
    expect(envRefs(withEnv, "ConfigMap")).toEqual([
      { field: "spec.env[1]: NO_PROXY", name: "net", keys: ["no-proxy"] },
      { field: "spec.env[2]: HF_HUB_OFFLINE", name: "hub", keys: ["offline"], optional: true },
    ]);
  });

  // [what, secret url, no-proxy, offline, reasons]
  const cases: [string, string | null, string | null, string | undefined, string[]][] = [
    ["all there", "http://p", "a,b", "1", []],
    ["the optional ConfigMap missing", "http://p", "a,b", undefined, []],
    ["the Secret missing", null, "a,b", "1", ["SecretNotFound"]],
    ["the ConfigMap missing", "http://p", null, "1", ["ConfigMapNotFound"]],
  ];
  it.each(cases)("problems: %s", (_what, url, noProxy, offline, reasons) => {
    const problems = [
      ...secretProblems("ns", referencedSecrets(withEnv), secrets(url)),
      ...configMapProblems("ns", envRefs(withEnv, "ConfigMap"), maps(noProxy, offline)),
    ];
    expect(problems.map((p) => p.reason)).toEqual(reasons);
  });

  it("names a ConfigMap without the key", () => {
    const contents: SecretContents = new Map([
      ["net", { other: b("x") }],
      ["hub", null],
    ]);
    expect(configMapProblems("ns", envRefs(withEnv, "ConfigMap"), contents)).toEqual([
      {
        reason: "ConfigMapKeyMissing",
        message: "ConfigMap ns/net (spec.env[1]: NO_PROXY) has no key no-proxy",
      },
    ]);
  });

  it("hash every value read (not the values themselves): a changed one changes it", () => {
    const h = envSourcesHash(withEnv, secrets("http://p"), maps("a,b", "1"))!;
    expect(h).toMatch(/^[0-9a-f]{16}$/);
    expect(envSourcesHash(withEnv, secrets("http://p"), maps("a,b", "1"))).toBe(h);
    const others = [
      envSourcesHash(withEnv, secrets("http://q"), maps("a,b", "1")),
      envSourcesHash(withEnv, secrets("http://p"), maps("a,c", "1")),
      envSourcesHash(withEnv, secrets("http://p"), maps("a,b")),
      envSourcesHash(withEnv, secrets(null), maps("a,b", "1")),
    ];
    expect(new Set([h, ...others]).size).toBe(5);
    expect(envSourcesHash(everything, new Map(), new Map())).toBeUndefined();
  });
});
