// TLS on the gateway's own ports (--tls-cert, --tls-key; spec.gateway.tls): the HTTP API
// (OpenAI, Anthropic, KServe REST) and the gRPC API answer over TLS with one certificate,
// read again when its files change (cert-manager renews a mounted Secret in place), so a
// renewal reaches new connections without a restart. With --tls-client-ca (mutual TLS) both
// APIs take only clients whose certificate one of its CAs signed, refused at the handshake;
// the metrics port stays plain HTTP (Prometheus scrapes it inside the cluster) and answers
// /health and /ready too, for the kubelet's probes, which present no certificate.
import type { PeerCertificate, TLSSocket } from "node:tls";
import type { experimental } from "@grpc/grpc-js";
import { readOptionFile } from "../cli/options.ts";
import { certificateSubject, pemCertificates, pemKeyPair } from "../util/pem.ts";

type CertificateProvider = experimental.CertificateProvider;
type CaCertificateUpdate = experimental.CaCertificateUpdate;
type CaCertificateUpdateListener = experimental.CaCertificateUpdateListener;
type IdentityCertificateUpdate = experimental.IdentityCertificateUpdate;
type IdentityCertificateUpdateListener = experimental.IdentityCertificateUpdateListener;

/** The files of a serving certificate, its key and the client CA, as the flags name them. */
export interface ServingTlsFiles {
  cert: string;
  key: string;
  /** --tls-client-ca: clients must present a certificate one of these CAs signed. */
  clientCa?: string | undefined;
}

/** A certificate chain and its key, PEM, checked to belong together; the client CA, checked. */
export interface ServingTls {
  cert: Buffer;
  key: Buffer;
  clientCa?: Buffer;
  /** The leaf certificate's subject and expiry (and the client CAs'), for the log. */
  summary: string;
}

/**
 * Reads and checks the files: EM_CLI_FILE for a file that cannot be read, EM_GATEWAY_TLS for
 * one that holds no PEM certificate or key, a key that is not the certificate's, or a client
 * CA file with anything but PEM certificates.
 */
export function readServingTls(files: ServingTlsFiles): ServingTls {
  const cert = readOptionFile(files.cert, "--tls-cert");
  const key = readOptionFile(files.key, "--tls-key");
  const leaf = pemKeyPair(
    { cert, key },
    { cert: `--tls-cert ${files.cert}`, key: `--tls-key ${files.key}` },
    "EM_GATEWAY_TLS",
  );
  let summary = `${certificateSubject(leaf)}, valid until ${leaf.validTo}`;
  if (files.clientCa === undefined) return { cert, key, summary };
  const clientCa = readOptionFile(files.clientCa, "--tls-client-ca");
  const cas = pemCertificates(clientCa, `--tls-client-ca ${files.clientCa}`, "EM_GATEWAY_TLS");
  summary += `; client certificates required, signed by ${cas.map(certificateSubject).join(" or ")}`;
  return { cert, key, clientCa, summary };
}

/**
 * The gateway's serving certificate (and client CA) as it is now, for the HTTP server
 * (onChange) and the gRPC server (a grpc-js CertificateProvider: its server credentials take
 * each new pair and CA for new connections). `watch` looks at the files every `intervalMs`
 * and takes them once they changed and check out; files that do not (a renewal caught
 * between its two files, a wrong key) are logged once and the previous ones kept.
 */
export class ServingCertificate implements CertificateProvider {
  #current: ServingTls;
  readonly #identityListeners = new Set<IdentityCertificateUpdateListener>();
  readonly #caListeners = new Set<CaCertificateUpdateListener>();
  readonly #changeListeners = new Set<(tls: ServingTls) => void>();
  #timer: NodeJS.Timeout | undefined;

  constructor(initial: ServingTls) {
    this.#current = initial;
  }

  get current(): ServingTls {
    return this.#current;
  }

  /** Whether clients must present a certificate (--tls-client-ca). */
  get verifiesClients(): boolean {
    return this.#current.clientCa !== undefined;
  }

  /** Takes new files (checked by readServingTls) and tells every listener. */
  set(next: ServingTls): void {
    this.#current = next;
    const ca = caUpdate(next);
    if (ca) for (const listener of this.#caListeners) listener(ca);
    for (const listener of this.#identityListeners) listener(identityUpdate(next));
    for (const listener of this.#changeListeners) listener(next);
  }

  onChange(listener: (tls: ServingTls) => void): void {
    this.#changeListeners.add(listener);
  }

  watch(files: ServingTlsFiles, intervalMs: number, log: (message: string) => void): void {
    this.stop();
    let lastFailure = "";
    this.#timer = setInterval(() => {
      let next: ServingTls;
      try {
        next = readServingTls(files);
      } catch (err) {
        const message = err instanceof Error ? err.message : String(err);
        if (message !== lastFailure)
          log(`TLS files changed but cannot be used (the previous ones stay): ${message}`);
        lastFailure = message;
        return;
      }
      lastFailure = "";
      if (sameFiles(next, this.#current)) return;
      this.set(next);
      log(`TLS files reloaded (${files.cert}): ${next.summary}`);
    }, intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  // CertificateProvider (grpc-js). Each listener is told the current files later, not now:
  // grpc-js adds its server's watcher only after asking for the listeners, and files told
  // before that would never reach the server (it would drop every connection as having no
  // credentials).
  addCaCertificateListener(listener: CaCertificateUpdateListener): void {
    this.#caListeners.add(listener);
    const first = caUpdate(this.#current);
    if (first)
      queueMicrotask(() => {
        if (this.#caListeners.has(listener)) listener(first);
      });
  }

  removeCaCertificateListener(listener: CaCertificateUpdateListener): void {
    this.#caListeners.delete(listener);
  }

  addIdentityCertificateListener(listener: IdentityCertificateUpdateListener): void {
    this.#identityListeners.add(listener);
    const first = identityUpdate(this.#current);
    queueMicrotask(() => {
      if (this.#identityListeners.has(listener)) listener(first);
    });
  }

  removeIdentityCertificateListener(listener: IdentityCertificateUpdateListener): void {
    this.#identityListeners.delete(listener);
  }
}

function identityUpdate(tls: ServingTls): IdentityCertificateUpdate {
  return { certificate: tls.cert, privateKey: tls.key };
}

function caUpdate(tls: ServingTls): CaCertificateUpdate | undefined {
  return tls.clientCa && { caCertificate: tls.clientCa };
}

function sameFiles(a: ServingTls, b: ServingTls): boolean {
  const same = (x: Buffer | undefined, y: Buffer | undefined) =>
    x === undefined || y === undefined ? x === y : x.equals(y);
  return a.cert.equals(b.cert) && a.key.equals(b.key) && same(a.clientCa, b.clientCa);
}

/**
 * Who a client certificate verified at the handshake names, for the request log: its CN,
 * else its first URI SAN (a SPIFFE ID), else its whole subject; undefined without one (no
 * --tls-client-ca, or a plain connection).
 */
export function clientIdentity(cert: PeerCertificate | undefined | null): string | undefined {
  if (!cert?.subject && !cert?.subjectaltname) return undefined;
  const cn = cert.subject?.CN;
  if (cn) return Array.isArray(cn) ? cn.join(",") : cn;
  const uri = cert.subjectaltname
    ?.split(/,\s*/)
    .find((n) => n.startsWith("URI:"))
    ?.slice(4);
  if (uri) return uri;
  const subject = Object.entries(cert.subject ?? {})
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : v}`)
    .join(", ");
  return subject || undefined;
}

/** The identity of the client certificate a verified TLS socket holds (clientIdentity). */
export function socketClientIdentity(socket: unknown): string | undefined {
  const tls = socket as Partial<TLSSocket> | undefined;
  if (!tls?.authorized || typeof tls.getPeerCertificate !== "function") return undefined;
  return clientIdentity(tls.getPeerCertificate());
}
