// How every expertmesh process connects to NATS: reconnect forever once connected (a
// restarting server or a network blip must not end a gateway, shard or operator), optional
// .creds credentials, TLS (a private CA, a client certificate for mutual TLS), and a first
// connection that may wait for a server still starting (pods and their NATS come up
// together) before it fails with EM_NATS_CONNECT.
import { createHash, createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import {
  connect,
  credsAuthenticator,
  type NatsConnection,
  type TlsOptions,
} from "@nats-io/transport-node";
import { ExpertMeshError } from "../util/errors.ts";

/** TLS to the NATS server: PEM text. Given at all, TLS is required (a plain server refused). */
export interface NatsTls {
  /** The CA certificate(s) that signed the server's certificate; absent: Node's roots. */
  ca?: string | undefined;
  /** A client certificate and its key, for servers that verify clients (mutual TLS). */
  cert?: string | undefined;
  key?: string | undefined;
  /**
   * The files the PEM text above was read from, if any: nats.js reads them again at each
   * reconnect's handshake, so certificates rotated in place (a cert-manager Secret's mounted
   * files) are used from the next reconnect on. The text is what was checked at start.
   */
  files?: { ca?: string | undefined; cert?: string | undefined; key?: string | undefined };
}

/** How a process proves itself to NATS and checks the server. */
export interface NatsAuth {
  /** Contents of a NATS .creds file. */
  creds?: Uint8Array | undefined;
  tls?: NatsTls | undefined;
}

/** Where each part of a NatsTls came from, for errors (a flag, a Secret's key). */
export interface NatsTlsSources {
  ca: string;
  cert: string;
  key: string;
}

/**
 * Checks that `tls` holds what it claims: PEM certificates for the CA and the client, a
 * private key that is the client certificate's, neither half of the pair alone. Throws
 * EM_NATS_TLS naming the source at fault (Node would take a garbage CA in silence and then
 * fail every handshake with "unable to verify the first certificate").
 */
export function checkNatsTls(tls: NatsTls, from: NatsTlsSources): void {
  const fail = (message: string, cause?: unknown): never => {
    throw new ExpertMeshError("EM_NATS_TLS", message, cause ? { cause } : undefined);
  };
  if ((tls.cert === undefined) !== (tls.key === undefined))
    fail(
      tls.cert === undefined
        ? `${from.key} is given without ${from.cert}: a client key needs its certificate`
        : `${from.cert} is given without ${from.key}: a client certificate needs its key`,
    );
  const certificate = (pem: string, what: string): X509Certificate => {
    if (!pem.includes("-----BEGIN CERTIFICATE-----"))
      fail(`${what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
    try {
      return new X509Certificate(pem);
    } catch (err) {
      return fail(`${what} is not a readable PEM certificate: ${errText(err)}`, err);
    }
  };
  const privateKey = (pem: string, what: string): KeyObject => {
    try {
      return createPrivateKey(pem);
    } catch (err) {
      return fail(`${what} is not a readable PEM private key: ${errText(err)}`, err);
    }
  };
  if (tls.ca !== undefined) certificate(tls.ca, from.ca);
  if (tls.cert !== undefined && tls.key !== undefined) {
    const cert = certificate(tls.cert, from.cert);
    if (!cert.checkPrivateKey(privateKey(tls.key, from.key)))
      fail(`${from.key} is not the key of ${from.cert} (${cert.subject.replace(/\n/g, ", ")})`);
  }
}

/**
 * A key naming a server and the auth used on it, for caches of connections and answers:
 * a digest, so secrets do not sit in map keys.
 */
export function natsAuthKey(url: string, auth: NatsAuth | undefined): string {
  const h = createHash("sha256");
  for (const part of [auth?.creds, auth?.tls?.ca, auth?.tls?.cert, auth?.tls?.key])
    h.update(part === undefined ? "-" : `${Buffer.byteLength(part)}:`).update(part ?? "");
  return `${url}#${auth?.creds || auth?.tls ? h.digest("hex").slice(0, 32) : ""}`;
}

/**
 * nats.js's options for a connection to `url` with `auth`: TLS when `auth.tls` is given or
 * the URL says tls:// (nats.js itself only follows what the server offers, so a tls:// URL
 * would go on in plain text to a server without it).
 */
export function natsConnectOptions(
  url: string,
  auth: NatsAuth | undefined,
): { authenticator?: ReturnType<typeof credsAuthenticator>; tls?: TlsOptions } {
  // The .creds text is parsed at the handshake: one that is none fails the connection
  // ("unable to parse credentials", EM_NATS_CONNECT).
  const authenticator = auth?.creds ? credsAuthenticator(auth.creds) : undefined;
  const tls = auth?.tls ?? (/^tls:\/\//i.test(url.trim()) ? {} : undefined);
  const tlsOptions: TlsOptions = {};
  for (const part of ["ca", "cert", "key"] as const) {
    const file = tls?.files?.[part];
    if (file) tlsOptions[`${part}File` as const] = file;
    else if (tls?.[part] !== undefined) tlsOptions[part] = tls[part];
  }
  return {
    ...(authenticator ? { authenticator } : {}),
    ...(tls ? { tls: tlsOptions } : {}),
  };
}

export async function connectNats(o: {
  url: string;
  /** Client name shown by the server (e.g. expertmesh-shard-0-<id>). */
  name: string;
  auth?: NatsAuth | undefined;
  reconnectWaitMs?: number;
  /**
   * How long the first connection may keep trying while the server cannot be reached
   * (refused, timed out, name not resolved); default 0: one try. Credentials refused and
   * bad URLs fail at once.
   */
  waitMs?: number;
  /** Told once when the first try failed and it goes on trying. */
  log?: (message: string) => void;
}): Promise<NatsConnection> {
  const waitMs = o.waitMs ?? 0;
  const deadline = Date.now() + waitMs;
  const options = natsConnectOptions(o.url, o.auth);
  for (let attempt = 0; ; attempt++) {
    try {
      return await connect({
        servers: o.url,
        name: o.name,
        maxReconnectAttempts: -1,
        reconnectTimeWait: o.reconnectWaitMs ?? 250,
        ...options,
      });
    } catch (err) {
      const why = connectFailure(err, options.tls !== undefined);
      if (err instanceof TypeError && /url/i.test(why))
        throw connectError(o.url, "not a NATS URL (nats://host:port)", err);
      if (!unreachable(err)) throw connectError(o.url, why, err);
      if (Date.now() >= deadline)
        throw connectError(
          o.url,
          waitMs > 0 ? `${why} (tried for ${Math.round(waitMs / 1000)} s)` : why,
          err,
        );
      if (attempt === 0)
        o.log?.(
          `NATS at ${o.url} not reachable (${why}): trying for up to ${Math.round(waitMs / 1000)} s`,
        );
      await sleep(Math.min(250 * 2 ** attempt, 2000, Math.max(0, deadline - Date.now())));
    }
  }
}

/** Node's codes for a server certificate it does not trust. */
const UNTRUSTED = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_SIGNATURE_FAILURE",
]);

/** Why a connection failed, in words that say what to do about a TLS failure. */
export function connectFailure(err: unknown, tls: boolean): string {
  const why = errText(err);
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === "string" && UNTRUSTED.has(code))
    return `the server's TLS certificate is not trusted (${why.replace(/;.*$/, "")}): give the CA that signed it (--nats-tls-ca, spec.nats.tls.caSecret)`;
  if (code === "CERT_HAS_EXPIRED" || code === "CERT_NOT_YET_VALID")
    return `the server's TLS certificate is not valid now (${why})`;
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID")
    return `the server's TLS certificate is not for this host (${why}): connect by a name the certificate holds`;
  if (/server does not support 'tls'/.test(why))
    return "the server does not offer TLS, which this connection requires (TLS files given, or a tls:// URL)";
  if (tls && (err as { name?: unknown } | null)?.name === "TimeoutError")
    return `${why} (a server that verifies clients drops a TLS connection without a client certificate it trusts: --nats-tls-cert and --nats-tls-key, spec.nats.tls.clientSecret)`;
  return why;
}

function errText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** A server that is not there (yet): refused, timed out, or a name not resolved. */
function unreachable(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  if (/server does not support 'tls'/.test(err.message)) return false;
  if (err.name === "ConnectionError" || err.name === "TimeoutError") return true;
  const code = (err as { code?: unknown }).code;
  return code === "ENOTFOUND" || code === "EAI_AGAIN" || code === "ECONNRESET";
}

function connectError(url: string, why: string, cause: unknown): ExpertMeshError {
  return new ExpertMeshError("EM_NATS_CONNECT", `cannot connect to NATS at ${url}: ${why}`, {
    cause,
  });
}
