// The pure parts of NATS over TLS: what checkNatsTls refuses, the options nats.js gets, the
// words a failed handshake is told in, and the cache key that must not carry secrets.
// Certificates are made with openssl, as the test control plane's are.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  checkNatsTls,
  connectFailure,
  type NatsTls,
  natsAuthKey,
  natsConnectOptions,
  tlsFailure,
} from "../../src/moe/nats-connection.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { makeNatsPki } from "../env/pki.ts";

let dir: string;
let pem: { ca: string; cert: string; key: string; serverKey: string; otherCa: string };
const from = { ca: "CA", cert: "CERT", key: "KEY" };

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "em-nats-tls-"));
  const pki = makeNatsPki(dir);
  const read = (p: string) => readFileSync(p, "utf8");
  pem = {
    ca: read(pki.ca),
    cert: read(pki.client.cert),
    key: read(pki.client.key),
    serverKey: read(pki.server.key),
    otherCa: read(pki.otherCa),
  };
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

function refusal(tls: NatsTls): string | undefined {
  try {
    checkNatsTls(tls, from);
    return undefined;
  } catch (err) {
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe("EM_NATS_TLS");
    return (err as Error).message;
  }
}

describe("checkNatsTls", () => {
  it("takes a CA, a client pair, both, or nothing; refuses half a pair, no PEM, a broken one, a key of another certificate", () => {
    const cases: [string, () => NatsTls, RegExp | undefined][] = [
      ["nothing (public roots)", () => ({}), undefined],
      ["a CA", () => ({ ca: pem.ca }), undefined],
      ["two CAs in one file", () => ({ ca: pem.ca + pem.otherCa }), undefined],
      ["a client pair", () => ({ cert: pem.cert, key: pem.key }), undefined],
      ["all three", () => ({ ca: pem.ca, cert: pem.cert, key: pem.key }), undefined],
      [
        "a certificate alone",
        () => ({ cert: pem.cert }),
        /^CERT is given without KEY: a client certificate needs its key$/,
      ],
      [
        "a key alone",
        () => ({ key: pem.key }),
        /^KEY is given without CERT: a client key needs its certificate$/,
      ],
      ["a CA that is text", () => ({ ca: "hello" }), /^CA holds no PEM certificate/],
      ["a CA that is a key", () => ({ ca: pem.key }), /^CA holds no PEM certificate/],
      [
        "a CA whose body is cut",
        () => ({ ca: pem.ca.replace(/\n[A-Za-z0-9+/]{64}\n/, "\nAAAA\n") }),
        /^CA is not a readable PEM certificate: /,
      ],
      [
        "a client certificate that is a key",
        () => ({ cert: pem.key, key: pem.key }),
        /^CERT holds no PEM certificate/,
      ],
      [
        "a key that is a certificate",
        () => ({ cert: pem.cert, key: pem.cert }),
        /^KEY is not a readable PEM private key: /,
      ],
      [
        "the server's key with the client's certificate",
        () => ({ cert: pem.cert, key: pem.serverKey }),
        /^KEY is not the key of CERT \(CN=expertmesh\)$/,
      ],
    ];
    for (const [name, tls, want] of cases) {
      const got = refusal(tls());
      if (want === undefined) expect(got, name).toBeUndefined();
      else expect(got, name).toMatch(want);
    }
  });
});

describe("natsConnectOptions", () => {
  it("asks nats.js for TLS when TLS files are given or the URL is tls://, and only then", () => {
    const cases: [string, NatsTls | undefined, Record<string, string> | undefined][] = [
      ["nats://h:4222", undefined, undefined],
      ["tls://h:4222", undefined, {}],
      ["TLS://h:4222", undefined, {}],
      [" tls://h:4222", undefined, {}],
      ["nats://h:4222", {}, {}],
      ["nats://h:4222", { ca: "A" }, { ca: "A" }],
      ["nats://h:4222", { ca: "A", cert: "C", key: "K" }, { ca: "A", cert: "C", key: "K" }],
      ["h:4222", { cert: "C", key: "K" }, { cert: "C", key: "K" }],
      // Files, where the text came from one: read again at each reconnect.
      [
        "nats://h:4222",
        { ca: "A", cert: "C", key: "K", files: { ca: "/a", cert: "/c", key: "/k" } },
        { caFile: "/a", certFile: "/c", keyFile: "/k" },
      ],
      ["nats://h:4222", { ca: "A", files: { ca: "/a" } }, { caFile: "/a" }],
      [
        "nats://h:4222",
        { ca: "A", cert: "C", key: "K", files: {} },
        { ca: "A", cert: "C", key: "K" },
      ],
    ];
    for (const [url, tls, want] of cases) {
      const o = natsConnectOptions(url, tls ? { tls } : undefined);
      expect(o.tls, `${url} ${JSON.stringify(tls)}`).toEqual(want);
      expect(o.authenticator).toBeUndefined();
    }
  });
});

describe("connectFailure", () => {
  const failure = (o: { message: string; code?: string; name?: string }) =>
    Object.assign(
      new Error(o.message),
      o.code ? { code: o.code } : {},
      o.name ? { name: o.name } : {},
    );
  it("tells a TLS failure what to do about it; other failures as they are", () => {
    const cases: [Error, boolean, RegExp][] = [
      [
        failure({
          message:
            "unable to verify the first certificate; if the root CA is installed locally, try running Node.js with --use-system-ca",
          code: "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
        }),
        true,
        /^the server's TLS certificate is not trusted \(unable to verify the first certificate\): give the CA that signed it \(--nats-tls-ca, spec\.nats\.tls\.caSecret\)$/,
      ],
      [
        failure({ message: "self-signed certificate", code: "DEPTH_ZERO_SELF_SIGNED_CERT" }),
        true,
        /^the server's TLS certificate is not trusted \(self-signed certificate\)/,
      ],
      [
        failure({ message: "certificate has expired", code: "CERT_HAS_EXPIRED" }),
        true,
        /^the server's TLS certificate is not valid now \(certificate has expired\)$/,
      ],
      [
        failure({
          message: "Hostname/IP does not match certificate's altnames",
          code: "ERR_TLS_CERT_ALTNAME_INVALID",
        }),
        true,
        /^the server's TLS certificate is not for this host .*: connect by a name the certificate holds$/,
      ],
      [
        failure({ message: "server does not support 'tls'", name: "ConnectionError" }),
        true,
        /^the server does not offer TLS, which this connection requires/,
      ],
      [
        failure({
          message: "SSL routines:ssl3_read_bytes:tlsv13 alert certificate required",
          code: "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED",
        }),
        true,
        /^the server requires a client certificate \(mutual TLS\) and this connection gave none: give one its CA signed \(--nats-tls-cert and --nats-tls-key, spec\.nats\.tls\.clientSecret\)$/,
      ],
      [
        failure({
          message:
            "40ADABE99B7F0000:error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:../deps/openssl/openssl/ssl/record/rec_layer_s3.c:918:SSL alert number 48",
          code: "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA",
        }),
        true,
        /^the server does not accept this connection's client certificate \(tlsv1 alert unknown ca\): give one signed by the CA it verifies clients with/,
      ],
      [
        failure({ message: "timeout", name: "TimeoutError" }),
        true,
        /^timeout \(a server that verifies clients drops a TLS connection without a client certificate it trusts: --nats-tls-cert and --nats-tls-key/,
      ],
      [failure({ message: "timeout", name: "TimeoutError" }), false, /^timeout$/],
      [
        failure({ message: "connection refused", name: "ConnectionError" }),
        true,
        /^connection refused$/,
      ],
    ];
    for (const [err, tls, want] of cases)
      expect(connectFailure(err, tls), err.message).toMatch(want);
  });

  it("tlsFailure: only a handshake that failed for certain, which the operator reports (NATSTLSFailed)", () => {
    const certain = [
      failure({ message: "self-signed certificate", code: "DEPTH_ZERO_SELF_SIGNED_CERT" }),
      failure({ message: "certificate is not yet valid", code: "CERT_NOT_YET_VALID" }),
      failure({ message: "altnames", code: "ERR_TLS_CERT_ALTNAME_INVALID" }),
      failure({ message: "server does not support 'tls'", name: "ConnectionError" }),
    ];
    for (const err of certain) expect(tlsFailure(err), err.message).toMatch(/^the server/);
    const uncertain = [
      failure({ message: "timeout", name: "TimeoutError" }),
      failure({ message: "connection refused", name: "ConnectionError" }),
      failure({ message: "Authorization Violation", name: "AuthorizationError" }),
      failure({ message: "getaddrinfo ENOTFOUND nats", code: "ENOTFOUND" }),
    ];
    for (const err of uncertain) expect(tlsFailure(err), err.message).toBeNull();
    expect(tlsFailure("not an error")).toBeNull();
    // A plain {code, message} (handshakeFailure's own words) reads as its message.
    expect(
      tlsFailure({ code: "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA", message: "dropped at the handshake" }),
    ).toMatch(
      /^the server does not accept this connection's client certificate \(dropped at the handshake\)/,
    );
  });
});

describe("natsAuthKey", () => {
  it("differs with the server and with every part of the auth, and holds no secret", () => {
    const url = "nats://h:4222";
    const creds = new TextEncoder().encode("-----BEGIN NATS USER JWT-----\nsecret");
    const seed = new TextEncoder().encode("SUsecret");
    const keys = [
      natsAuthKey(url, undefined),
      natsAuthKey("nats://other:4222", undefined),
      natsAuthKey(url, { identity: { kind: "creds", creds } }),
      natsAuthKey(url, { identity: { kind: "user", user: "a", password: "secret" } }),
      natsAuthKey(url, { identity: { kind: "user", user: "a", password: "secret2" } }),
      natsAuthKey(url, { identity: { kind: "user", user: "b", password: "secret" } }),
      natsAuthKey(url, { identity: { kind: "user", user: "as", password: "ecret" } }),
      natsAuthKey(url, { identity: { kind: "token", token: "secret" } }),
      natsAuthKey(url, { identity: { kind: "nkey", seed } }),
      natsAuthKey(url, { tls: {} }),
      natsAuthKey(url, { tls: { ca: pem.ca } }),
      natsAuthKey(url, { tls: { ca: pem.otherCa } }),
      natsAuthKey(url, { tls: { ca: pem.ca, cert: pem.cert, key: pem.key } }),
      natsAuthKey(url, { identity: { kind: "creds", creds }, tls: { ca: pem.ca } }),
      // Parts that concatenate alike stay apart.
      natsAuthKey(url, { tls: { ca: "ab", cert: "c" } }),
      natsAuthKey(url, { tls: { ca: "a", cert: "bc" } }),
    ];
    expect(new Set(keys).size).toBe(keys.length);
    expect(natsAuthKey(url, { tls: { ca: pem.ca } })).toBe(
      natsAuthKey(url, { tls: { ca: pem.ca } }),
    );
    expect(natsAuthKey(url, undefined)).toBe(`${url}#`);
    for (const k of keys) {
      expect(k).not.toContain("secret");
      expect(k).not.toContain("BEGIN");
      expect(k.length).toBeLessThan(url.length + 40);
    }
  });
});
