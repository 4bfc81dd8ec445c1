// PEM certificates and private keys a user hands in (flags' files, Secrets' keys), checked
// before they are used: Node takes a CA that is no certificate in silence and then fails
// every handshake ("unable to verify the first certificate"), and a key that is not the
// certificate's only at the first connection. Each check throws ExpertMeshError with the
// caller's code, naming the source at fault (`what`: a flag and its file, a Secret's key).
import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { type ErrorCode, ExpertMeshError } from "./errors.ts";

const BEGIN_CERTIFICATE = "-----BEGIN CERTIFICATE-----";

/** The first certificate of `pem` (a chain or a CA bundle may hold more). */
export function pemCertificate(
  pem: string | Buffer,
  what: string,
  code: ErrorCode,
): X509Certificate {
  const text = typeof pem === "string" ? pem : pem.toString("utf8");
  if (!text.includes(BEGIN_CERTIFICATE))
    throw new ExpertMeshError(code, `${what} holds no PEM certificate (${BEGIN_CERTIFICATE})`);
  try {
    return new X509Certificate(text);
  } catch (err) {
    throw new ExpertMeshError(code, `${what} is not a readable PEM certificate: ${why(err)}`, {
      cause: err,
    });
  }
}

/** Each certificate of a CA bundle, every one readable. */
export function pemCertificates(
  pem: string | Buffer,
  what: string,
  code: ErrorCode,
): X509Certificate[] {
  const text = typeof pem === "string" ? pem : pem.toString("utf8");
  const blocks = text.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g);
  if (!blocks) return [pemCertificate(text, what, code)]; // says what is wrong with it
  return blocks.map((block, i) =>
    pemCertificate(block, blocks.length > 1 ? `${what} (certificate ${i + 1})` : what, code),
  );
}

export function pemPrivateKey(pem: string | Buffer, what: string, code: ErrorCode): KeyObject {
  try {
    return createPrivateKey(pem);
  } catch (err) {
    throw new ExpertMeshError(code, `${what} is not a readable PEM private key: ${why(err)}`, {
      cause: err,
    });
  }
}

/**
 * A certificate (chain) and the private key that must be its leaf's: the leaf, checked.
 * `from` names each half's source for the errors.
 */
export function pemKeyPair(
  pair: { cert: string | Buffer; key: string | Buffer },
  from: { cert: string; key: string },
  code: ErrorCode,
): X509Certificate {
  const leaf = pemCertificate(pair.cert, from.cert, code);
  if (!leaf.checkPrivateKey(pemPrivateKey(pair.key, from.key, code)))
    throw new ExpertMeshError(
      code,
      `${from.key} is not the key of ${from.cert} (${certificateSubject(leaf)})`,
    );
  return leaf;
}

/** A certificate's subject on one line (CN=nats, O=example). */
export function certificateSubject(cert: X509Certificate): string {
  return cert.subject.replace(/\n/g, ", ");
}

function why(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
