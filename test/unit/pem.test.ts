// The PEM checks shared by the NATS TLS files, the gateway's serving certificate and its
// client CA (src/util/pem.ts): what each accepts, and the code and words of each refusal.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { pemCertificates, pemKeyPair } from "../../src/util/pem.ts";
import { makeNatsPki, type NatsPki } from "../env/pki.ts";

let dir: string;
let pki: NatsPki;
const read = (p: string) => readFileSync(p, "utf8");

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "em-pem-"));
  pki = makeNatsPki(dir);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function refusal(run: () => unknown): string {
  try {
    run();
  } catch (err) {
    expect(err).toBeInstanceOf(ExpertMeshError);
    return `${(err as ExpertMeshError).code}: ${(err as Error).message}`;
  }
  throw new Error("not refused");
}

describe("pemCertificates", () => {
  it("reads every certificate of a bundle, as bytes or text", () => {
    const bundle = read(pki.ca) + read(pki.otherCa);
    const subjects = (pem: string | Buffer) =>
      pemCertificates(pem, "ca", "EM_GATEWAY_TLS").map((c) => c.subject);
    expect(subjects(bundle)).toEqual(["CN=expertmesh-test-nats-ca", "CN=some-other-ca"]);
    expect(subjects(Buffer.from(read(pki.ca)))).toEqual(["CN=expertmesh-test-nats-ca"]);
  });

  it.each<[string, () => string, string]>([
    ["nothing", () => "", "EM_NATS_TLS: ca holds no PEM certificate (-----BEGIN CERTIFICATE-----)"],
    ["a key", () => read(pki.client.key), "EM_NATS_TLS: ca holds no PEM certificate"],
    [
      "a certificate without its end",
      () => "-----BEGIN CERTIFICATE-----\nMIIB\n",
      "EM_NATS_TLS: ca is not a readable PEM certificate: ",
    ],
    [
      "a bundle with a broken second certificate",
      () => `${read(pki.ca)}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n`,
      "EM_NATS_TLS: ca (certificate 2) is not a readable PEM certificate: ",
    ],
  ])("refuses %s", (_, pem, start) => {
    const got = refusal(() => pemCertificates(pem(), "ca", "EM_NATS_TLS"));
    expect(got.startsWith(start), got).toBe(true);
  });
});

describe("pemKeyPair", () => {
  const from = { cert: "--tls-cert c.pem", key: "--tls-key k.pem" };

  it("returns the leaf of a certificate and its key", () => {
    const leaf = pemKeyPair(
      { cert: readFileSync(pki.server.cert), key: readFileSync(pki.server.key) },
      from,
      "EM_GATEWAY_TLS",
    );
    expect(leaf.subject).toBe("CN=nats");
  });

  it("takes an ECDSA P-256 pair as it takes an RSA one, and tells the two apart", () => {
    const ecdsa = pki.serverEcdsa;
    const leaf = pemKeyPair(
      { cert: readFileSync(ecdsa.cert), key: readFileSync(ecdsa.key) },
      from,
      "EM_GATEWAY_TLS",
    );
    expect(leaf.publicKey.asymmetricKeyType).toBe("ec");
    const mixed = refusal(() =>
      pemKeyPair({ cert: read(ecdsa.cert), key: read(pki.server.key) }, from, "EM_GATEWAY_TLS"),
    );
    expect(mixed).toBe(
      "EM_GATEWAY_TLS: --tls-key k.pem is not the key of --tls-cert c.pem (CN=nats)",
    );
  });

  it.each<[string, () => { cert: string; key: string }, string]>([
    [
      "another certificate's key",
      () => ({ cert: read(pki.server.cert), key: read(pki.client.key) }),
      "EM_GATEWAY_TLS: --tls-key k.pem is not the key of --tls-cert c.pem (CN=nats)",
    ],
    [
      "a key that is a certificate",
      () => ({ cert: read(pki.server.cert), key: read(pki.server.cert) }),
      "EM_GATEWAY_TLS: --tls-key k.pem is not a readable PEM private key: ",
    ],
    [
      "a certificate that is a key",
      () => ({ cert: read(pki.server.key), key: read(pki.server.key) }),
      "EM_GATEWAY_TLS: --tls-cert c.pem holds no PEM certificate",
    ],
  ])("refuses %s", (_, pair, start) => {
    const got = refusal(() => pemKeyPair(pair(), from, "EM_GATEWAY_TLS"));
    expect(got.startsWith(start), got).toBe(true);
  });
});
