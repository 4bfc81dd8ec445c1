// How every expertmesh process connects to NATS: reconnect forever once connected (a
// restarting server or a network blip must not end a gateway, shard or operator), who it is
// to the server (a .creds file, a user and password, a token or an NKEY seed: ADR 0032),
// TLS (a private CA, a client certificate for mutual TLS: ADR 0031), and a first connection
// that may wait for a server still starting (pods and their NATS come up together) before it
// fails with EM_NATS_CONNECT.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createConnection } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import {
  type Authenticator,
  connect,
  credsAuthenticator,
  type NatsConnection,
  nkeyAuthenticator,
  nkeys,
  PermissionViolationError,
  type TlsOptions,
  tokenAuthenticator,
  usernamePasswordAuthenticator,
} from "@nats-io/transport-node";
import { ExpertMeshError } from "../util/errors.ts";
import { pemCertificates, pemKeyPair } from "../util/pem.ts";

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

/**
 * Who a process is to the NATS server: one of these (a server authenticates a connection by
 * one). Each value is what was checked at start; `file`s, when given, are read again at each
 * reconnect's handshake, so a Secret rotated in place (a renewed .creds JWT, a new password)
 * is used from the next reconnect on without a restart.
 */
export type NatsIdentity =
  | { kind: "creds"; creds: Uint8Array; file?: string | undefined }
  | {
      kind: "user";
      user: string;
      password: string;
      files?: { user?: string | undefined; password?: string | undefined };
    }
  | { kind: "token"; token: string; file?: string | undefined }
  | { kind: "nkey"; seed: Uint8Array; file?: string | undefined };

/** How a process proves itself to NATS and checks the server. */
export interface NatsAuth {
  identity?: NatsIdentity | undefined;
  tls?: NatsTls | undefined;
}

/** Where each part of an identity came from, for errors (a flag, a Secret's key). */
export interface NatsIdentitySources {
  creds?: string;
  user?: string;
  password?: string;
  token?: string;
  nkey?: string;
}

/**
 * A secret's text as it is used: without the line ends a file or Secret often carries at its
 * end (`echo pw > file`, `kubectl create secret --from-file`); nothing else is trimmed.
 */
export function secretText(bytes: Uint8Array | string): string {
  return (typeof bytes === "string" ? bytes : Buffer.from(bytes).toString("utf8")).replace(
    /[\r\n]+$/,
    "",
  );
}

/**
 * Checks that `identity` holds what it claims: a .creds file with a user JWT and its seed,
 * a user name and a password, a token, an NKEY user seed (SU...), none of them empty. Throws
 * EM_NATS_AUTH naming the source at fault (nats.js would find out at the handshake, after
 * the weights loaded, as "unable to parse credentials" or an authorization violation).
 */
export function checkNatsIdentity(identity: NatsIdentity, from: NatsIdentitySources): void {
  const fail = (message: string): never => {
    throw new ExpertMeshError("EM_NATS_AUTH", message);
  };
  switch (identity.kind) {
    case "creds": {
      const text = Buffer.from(identity.creds).toString("utf8");
      for (const [part, what] of [
        ["JWT", "the user JWT (-----BEGIN NATS USER JWT-----)"],
        ["NKEY SEED", "the user's seed (-----BEGIN USER NKEY SEED-----)"],
      ] as const)
        if (
          !new RegExp(`-----BEGIN [A-Z ]*${part}-----\\s*\\S+\\s*-*END [A-Z ]*${part}-----`).test(
            text,
          )
        )
          fail(
            `${from.creds ?? "the credentials"} is not a NATS .creds file: it lacks ${what}, as nsc writes them`,
          );
      return;
    }
    case "user":
      if (identity.user === "") fail(`${from.user ?? "the NATS user"} is empty`);
      if (/\s/.test(identity.user))
        fail(`${from.user ?? "the NATS user"} holds white space: it must be one name`);
      if (identity.password === "") fail(`${from.password ?? "the NATS password"} is empty`);
      return;
    case "token":
      if (identity.token === "") fail(`${from.token ?? "the NATS token"} is empty`);
      return;
    case "nkey": {
      const what = from.nkey ?? "the NKEY seed";
      const seed = secretText(identity.seed);
      if (!seed.startsWith("SU"))
        fail(
          `${what} is not an NKEY user seed: it must start with SU (nsc or nk -gen user writes one; the public key, U..., goes in the server's config)`,
        );
      try {
        nkeys.fromSeed(new TextEncoder().encode(seed));
      } catch (err) {
        fail(`${what} is not an NKEY user seed: ${errText(err)}`);
      }
      return;
    }
  }
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
  if ((tls.cert === undefined) !== (tls.key === undefined))
    throw new ExpertMeshError(
      "EM_NATS_TLS",
      tls.cert === undefined
        ? `${from.key} is given without ${from.cert}: a client key needs its certificate`
        : `${from.cert} is given without ${from.key}: a client certificate needs its key`,
    );
  if (tls.ca !== undefined) pemCertificates(tls.ca, from.ca, "EM_NATS_TLS");
  if (tls.cert !== undefined && tls.key !== undefined)
    pemKeyPair({ cert: tls.cert, key: tls.key }, from, "EM_NATS_TLS");
}

/**
 * A key naming a server and the auth used on it, for caches of connections and answers:
 * a digest, so secrets do not sit in map keys.
 */
export function natsAuthKey(url: string, auth: NatsAuth | undefined): string {
  if (!auth?.identity && !auth?.tls) return `${url}#`;
  const h = createHash("sha256");
  const id = auth.identity;
  const secrets: (Uint8Array | string | undefined)[] = [
    id?.kind,
    id?.kind === "creds" ? id.creds : undefined,
    id?.kind === "user" ? id.user : undefined,
    id?.kind === "user" ? id.password : undefined,
    id?.kind === "token" ? id.token : undefined,
    id?.kind === "nkey" ? id.seed : undefined,
    auth.tls?.ca,
    auth.tls?.cert,
    auth.tls?.key,
  ];
  for (const part of secrets)
    h.update(part === undefined ? "-" : `${Buffer.byteLength(part)}:`).update(part ?? "");
  return `${url}#${h.digest("hex").slice(0, 32)}`;
}

/**
 * A value read from `file` at each call, as `parse` makes it, or `checked` (what was checked
 * at start) when there is no file or it cannot be read or parsed now (a Secret's files are
 * swapped by a symlink, so a read sees the old files or the new, but be safe).
 */
function fresh<T>(
  checked: T,
  file: string | undefined,
  parse: (bytes: Buffer) => T | null,
): () => T {
  if (!file) return () => checked;
  let last = checked;
  return () => {
    try {
      last = parse(readFileSync(file)) ?? last;
    } catch {
      // keep the last value read
    }
    return last;
  };
}

const nonEmpty = (bytes: Buffer) => secretText(bytes) || null;

/** nats.js's authenticator for `identity`, reading its files again at each handshake. */
function authenticatorOf(identity: NatsIdentity): Authenticator {
  switch (identity.kind) {
    case "creds":
      // The .creds text is parsed at the handshake: one that is none fails the connection
      // ("unable to parse credentials", EM_NATS_CONNECT); checkNatsIdentity refuses it first.
      return credsAuthenticator(
        fresh(identity.creds, identity.file, (b) => (b.length ? new Uint8Array(b) : null)),
      );
    case "user":
      return usernamePasswordAuthenticator(
        fresh(identity.user, identity.files?.user, nonEmpty),
        fresh(identity.password, identity.files?.password, nonEmpty),
      );
    case "token":
      return tokenAuthenticator(fresh(identity.token, identity.file, nonEmpty));
    case "nkey": {
      const seed = (bytes: Uint8Array) => new TextEncoder().encode(secretText(bytes));
      return nkeyAuthenticator(
        fresh(seed(identity.seed), identity.file, (b) => {
          const s = seed(b);
          return s.length ? s : null;
        }),
      );
    }
  }
}

/**
 * Credentials in a URL's user part (nats://user:pass@host, nats://token@host), which nats.js
 * ignores: refused with EM_NATS_AUTH (the password not repeated), since the server would
 * answer "Authorization Violation" with no word on why, and a URL's password shows in
 * process lists, logs and the pod spec.
 */
export function checkNatsUrlCredentials(url: string): void {
  const m = /^\s*([a-z][a-z0-9+.-]*:\/\/)([^/@?#]*)@/i.exec(url);
  if (!m) return;
  throw new ExpertMeshError(
    "EM_NATS_AUTH",
    `the NATS URL ${m[1]}***@${url.slice(m[0].length)} holds credentials, which are not read from a URL: give them with --nats-user and --nats-password-file, --nats-token-file, --nats-nkey or --nats-creds (spec.nats.userSecret, tokenSecret, nkeySecret or credentialsSecret)`,
  );
}

/**
 * nats.js's options for a connection to `url` with `auth`: TLS when `auth.tls` is given or
 * the URL says tls:// (nats.js itself only follows what the server offers, so a tls:// URL
 * would go on in plain text to a server without it).
 */
export function natsConnectOptions(
  url: string,
  auth: NatsAuth | undefined,
): { authenticator?: Authenticator; tls?: TlsOptions } {
  const authenticator = auth?.identity ? authenticatorOf(auth.identity) : undefined;
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
  /**
   * Also logs what happens to the connection once open (watchStatus). Told once when the
   * first try failed and it goes on trying.
   */
  log?: (message: string) => void;
  /**
   * Where replies to this connection's requests go (nats.js's default: _INBOX): a model's
   * processes use subjects.inboxPrefix, so that all they say is under em.<ns>.<model>.>.
   */
  inboxPrefix?: string;
  /** Told of each publish or subscription the server refuses (besides the log line). */
  onPermissionDenied?: (err: PermissionViolationError) => void;
}): Promise<NatsConnection> {
  checkNatsUrlCredentials(o.url);
  const waitMs = o.waitMs ?? 0;
  const deadline = Date.now() + waitMs;
  const options = natsConnectOptions(o.url, o.auth);
  for (let attempt = 0; ; attempt++) {
    try {
      if (options.tls) await handshakeOnce(o.url, options);
      const nc = await connect({
        servers: o.url,
        name: o.name,
        maxReconnectAttempts: -1,
        reconnectTimeWait: o.reconnectWaitMs ?? 250,
        // nats.js closes a connection for good when a reconnect is refused twice with the same
        // error: a password or .creds rotated on the server a little before its Secret's
        // files would end a process's NATS for its life. Keep trying (watchStatus says why).
        ignoreAuthErrorAbort: true,
        ...(o.inboxPrefix ? { inboxPrefix: o.inboxPrefix } : {}),
        ...options,
      });
      if (o.log || o.onPermissionDenied)
        void watchStatus(nc, o.log ?? (() => {}), o.onPermissionDenied);
      return nc;
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

/**
 * Logs what happens to an open connection, which nats.js otherwise handles in silence: lost,
 * back (after how long), the server's errors (credentials refused at a reconnect: a password
 * rotated on the server but not in the Secret would keep a process out with no word), lame
 * duck mode. Each distinct error once per outage: nats.js retries every reconnectTimeWait.
 * Permissions the server refuses are also handed to `onPermissionDenied`.
 */
async function watchStatus(
  nc: NatsConnection,
  log: (message: string) => void,
  onPermissionDenied?: (err: PermissionViolationError) => void,
): Promise<void> {
  // nats.js tells a refused reconnect as another disconnect, and may tell one reconnect
  // several times: what is logged follows the state, online or not.
  let lostAt = 0;
  const said = new Set<string>();
  for await (const s of nc.status()) {
    switch (s.type) {
      case "disconnect":
        if (lostAt) break;
        lostAt = Date.now();
        log(`NATS connection to ${s.server} lost: reconnecting`);
        break;
      case "reconnect":
        if (!lostAt) break;
        log(
          `reconnected to NATS at ${s.server} after ${((Date.now() - lostAt) / 1000).toFixed(1)} s`,
        );
        said.clear();
        lostAt = 0;
        break;
      case "error": {
        if (s.error instanceof PermissionViolationError) onPermissionDenied?.(s.error);
        const why = connectFailure(s.error, false);
        if (said.has(why)) break;
        said.add(why);
        log(`NATS: ${why}`);
        break;
      }
      case "ldm":
        log(`NATS server ${s.server} is shutting down (lame duck mode): clients move elsewhere`);
        break;
    }
  }
}

/**
 * EM_NATS_PERMISSION for a subscription the server refused: the process cannot hear its
 * requests (a shard), plan changes or replies, so it stops rather than sit deaf. `scope`: the
 * subjects its NATS user needs (subjects.all of its model).
 */
export function subscriptionRefused(err: PermissionViolationError, scope: string): ExpertMeshError {
  return new ExpertMeshError(
    "EM_NATS_PERMISSION",
    `NATS refused the subscription to ${err.subject}${err.queue ? ` (queue group ${err.queue})` : ""}: this process's NATS user needs publish and subscribe on ${scope}`,
  );
}

/**
 * How long `nc` has been without its server, in ms (0 while connected), from its status
 * events: nats.js keeps reconnecting for ever, so `isClosed()` never says so.
 */
export function outageClock(nc: NatsConnection, now: () => number = Date.now): () => number {
  let lostAt = 0;
  void (async () => {
    for await (const s of nc.status()) {
      if (s.type === "disconnect" && !lostAt) lostAt = now();
      else if (s.type === "reconnect") lostAt = 0;
    }
  })();
  return () => (lostAt ? now() - lostAt : 0);
}

/** The inbox prefix a connection was opened with (nats.js keeps its options). */
export function inboxPrefixOf(nc: NatsConnection): string | undefined {
  return (nc as { options?: { inboxPrefix?: string } }).options?.inboxPrefix;
}

/**
 * One connection without retries, closed at once: nats.js retries a TLS handshake the server
 * refuses (a client certificate missing or from another CA) until its connect timeout, 20 s,
 * and then says only "timeout"; alone, it fails at once. Throws why (handshakeFailure's
 * words) when the handshake failed; any other failure is left to the real connection.
 */
async function handshakeOnce(url: string, options: ReturnType<typeof natsConnectOptions>) {
  try {
    const nc = await connect({
      servers: url,
      name: "expertmesh-handshake",
      reconnect: false,
      timeout: HANDSHAKE_TIMEOUT_MS,
      ...options,
    });
    await nc.close();
  } catch (err) {
    const why = await handshakeFailure(url, options, err);
    if (why !== null)
      throw Object.assign(new Error(why, { cause: err }), { name: "TlsHandshakeError" });
  }
}

/**
 * Why a TLS connection to `url` with `options` failed with `err`, when it was the handshake:
 * tlsFailure's reasons, or a server that verifies clients (its INFO, sent in plain text
 * before the handshake, says tls_verify) and dropped the connection at the handshake. The
 * server then sends an alert (certificate required, unknown CA) and closes, and which of
 * the two a busy client reads first varies: a reset means the same. Null: not the handshake.
 */
export async function handshakeFailure(
  url: string,
  options: ReturnType<typeof natsConnectOptions>,
  err: unknown,
): Promise<string | null> {
  const known = tlsFailure(err);
  if (known !== null || !options.tls) return known;
  const e = err as { code?: unknown; name?: unknown } | null;
  if (e?.code !== "ECONNRESET" && e?.code !== "EPIPE" && e?.name !== "TimeoutError") return null;
  const info = await serverInfo(url, HANDSHAKE_TIMEOUT_MS);
  if (info?.["tls_verify"] !== true) return null;
  const given = Boolean(options.tls.cert || options.tls.certFile);
  return tlsFailure({
    code: given ? "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA" : "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED",
    message: "the server verifies client certificates and dropped the connection at the handshake",
  });
}

/**
 * The INFO a NATS server sends each new connection in plain text, before any TLS handshake
 * (`tls_required`, `tls_verify`, `auth_required`, ...), from the first server of `url`; null
 * when none comes within `timeoutMs` (no server, one that wants TLS first, not NATS).
 */
export function serverInfo(
  url: string,
  timeoutMs: number,
): Promise<Record<string, unknown> | null> {
  let host: string;
  let port: number;
  try {
    const first = (url.split(",")[0] ?? "").trim().replace(/^[a-z]+:\/\//i, "");
    const u = new URL(`nats://${first}`);
    host = u.hostname.replace(/^\[(.*)\]$/, "$1");
    port = Number(u.port || 4222);
  } catch {
    return Promise.resolve(null);
  }
  return new Promise((resolve) => {
    const socket = createConnection({ host, port });
    let text = "";
    const done = (info: Record<string, unknown> | null) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(info);
    };
    const timer = setTimeout(() => done(null), timeoutMs);
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      text += chunk;
      const end = text.indexOf("\r\n");
      if (end < 0) {
        if (text.length > 64 * 1024) done(null);
        return;
      }
      const line = text.slice(0, end);
      try {
        const info: unknown = line.startsWith("INFO ") ? JSON.parse(line.slice(5)) : null;
        done(info !== null && typeof info === "object" ? (info as Record<string, unknown>) : null);
      } catch {
        done(null);
      }
    });
    socket.on("error", () => done(null));
    socket.on("close", () => done(null));
  });
}

/** How long handshakeOnce waits for the server (a slow one is then left to connect's own). */
const HANDSHAKE_TIMEOUT_MS = 5000;

/** Node's codes for a server certificate it does not trust. */
const UNTRUSTED = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_SIGNATURE_FAILURE",
]);

/**
 * Why the TLS handshake failed, when that is certain: a server certificate this side does not
 * trust, not valid now or for another host, or a server that offers no TLS; else null.
 */
export function tlsFailure(err: unknown): string | null {
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
  // The server's TLS alerts about this side's certificate (mutual TLS).
  if (code === "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED")
    return "the server requires a client certificate (mutual TLS) and this connection gave none: give one its CA signed (--nats-tls-cert and --nats-tls-key, spec.nats.tls.clientSecret)";
  if (typeof code === "string" && CLIENT_CERT_REFUSED.has(code))
    return `the server does not accept this connection's client certificate (${/(?:tlsv1|sslv3|tlsv13) alert [a-z ]+/.exec(why)?.[0] ?? why}): give one signed by the CA it verifies clients with (--nats-tls-cert and --nats-tls-key, spec.nats.tls.clientSecret)`;
  return null;
}

/** Node's codes for the server's TLS alerts that refuse the client's certificate. */
const CLIENT_CERT_REFUSED = new Set([
  "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA",
  "ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE",
  "ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN",
  "ERR_SSL_SSLV3_ALERT_CERTIFICATE_EXPIRED",
  "ERR_SSL_SSLV3_ALERT_CERTIFICATE_REVOKED",
  "ERR_SSL_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
]);

/** Why a connection failed, in words that say what to do about a TLS failure. */
export function connectFailure(err: unknown, tls: boolean): string {
  const why = errText(err);
  const handshake = tlsFailure(err);
  if (handshake !== null) return handshake;
  if ((err as { name?: unknown } | null)?.name === "AuthorizationError")
    return `the server refused this connection's credentials (${why}): give the ones it knows (--nats-user and --nats-password-file, --nats-token-file, --nats-nkey or --nats-creds; spec.nats.userSecret, tokenSecret, nkeySecret or credentialsSecret)`;
  if (tls && (err as { name?: unknown } | null)?.name === "TimeoutError")
    return `${why} (a server that verifies clients drops a TLS connection without a client certificate it trusts: --nats-tls-cert and --nats-tls-key, spec.nats.tls.clientSecret)`;
  return why;
}

/** An error's message; also a plain object's ({code, message}, as handshakeFailure builds). */
function errText(err: unknown): string {
  if (err instanceof Error) return err.message;
  const message = (err as { message?: unknown } | null)?.message;
  return typeof message === "string" ? message : String(err);
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
