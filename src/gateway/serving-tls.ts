// TLS on the gateway's own ports (--tls-cert, --tls-key; spec.gateway.tls): the HTTP API
// (OpenAI, Anthropic, KServe REST) and the gRPC API answer over TLS with one certificate,
// read again when its files change (cert-manager renews a mounted Secret in place), so a
// renewal reaches new connections without a restart. The metrics port stays plain HTTP
// (Prometheus scrapes it inside the cluster).
import { createPrivateKey, X509Certificate } from "node:crypto";
import type { experimental } from "@grpc/grpc-js";
import { readOptionFile } from "../cli/options.ts";
import { ExpertMeshError } from "../util/errors.ts";

type CertificateProvider = experimental.CertificateProvider;
type CaCertificateUpdateListener = experimental.CaCertificateUpdateListener;
type IdentityCertificateUpdate = experimental.IdentityCertificateUpdate;
type IdentityCertificateUpdateListener = experimental.IdentityCertificateUpdateListener;

/** The files of a serving certificate and its key, as the flags name them. */
export interface ServingTlsFiles {
  cert: string;
  key: string;
}

/** A certificate chain and its key, PEM, checked to belong together. */
export interface ServingTls {
  cert: Buffer;
  key: Buffer;
  /** The leaf certificate's subject and expiry, for the log. */
  summary: string;
}

/**
 * Reads and checks the pair: EM_CLI_FILE for a file that cannot be read, EM_GATEWAY_TLS for
 * one that holds no PEM certificate or key, or a key that is not the certificate's.
 */
export function readServingTls(files: ServingTlsFiles): ServingTls {
  const cert = readOptionFile(files.cert, "--tls-cert");
  const key = readOptionFile(files.key, "--tls-key");
  const fail = (message: string, cause?: unknown): never => {
    throw new ExpertMeshError("EM_GATEWAY_TLS", message, cause ? { cause } : undefined);
  };
  const text = cert.toString("utf8");
  if (!text.includes("-----BEGIN CERTIFICATE-----"))
    fail(`--tls-cert ${files.cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)`);
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(text);
  } catch (err) {
    return fail(`--tls-cert ${files.cert} is not a readable PEM certificate: ${why(err)}`, err);
  }
  try {
    if (!leaf.checkPrivateKey(createPrivateKey(key)))
      fail(`--tls-key ${files.key} is not the key of --tls-cert ${files.cert} (${subject(leaf)})`);
  } catch (err) {
    if (err instanceof ExpertMeshError) throw err;
    return fail(`--tls-key ${files.key} is not a readable PEM private key: ${why(err)}`, err);
  }
  return { cert, key, summary: `${subject(leaf)}, valid until ${leaf.validTo}` };
}

/**
 * The gateway's serving certificate as it is now, for the HTTP server (onChange) and the gRPC
 * server (a grpc-js CertificateProvider: its server credentials take each new pair for new
 * connections). `watch` looks at the files every `intervalMs` and takes a pair once it
 * changed and checks out; one that does not (a renewal caught between its two files, a
 * wrong key) is logged once and the previous pair kept.
 */
export class ServingCertificate implements CertificateProvider {
  #current: ServingTls;
  readonly #identityListeners = new Set<IdentityCertificateUpdateListener>();
  readonly #changeListeners = new Set<(tls: ServingTls) => void>();
  #timer: NodeJS.Timeout | undefined;

  constructor(initial: ServingTls) {
    this.#current = initial;
  }

  get current(): ServingTls {
    return this.#current;
  }

  /** Takes a new pair (checked by readServingTls) and tells every listener. */
  set(next: ServingTls): void {
    this.#current = next;
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
          log(`TLS files changed but cannot be used (the previous certificate stays): ${message}`);
        lastFailure = message;
        return;
      }
      lastFailure = "";
      if (next.cert.equals(this.#current.cert) && next.key.equals(this.#current.key)) return;
      this.set(next);
      log(`TLS certificate reloaded from ${files.cert}: ${next.summary}`);
    }, intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  // CertificateProvider (grpc-js): no CA (clients are not asked for certificates).
  addCaCertificateListener(_listener: CaCertificateUpdateListener): void {}
  removeCaCertificateListener(_listener: CaCertificateUpdateListener): void {}

  addIdentityCertificateListener(listener: IdentityCertificateUpdateListener): void {
    this.#identityListeners.add(listener);
    // Later, not now: grpc-js adds its server's watcher only after asking for the listener,
    // and a pair told before that would never reach the server (it would drop every
    // connection as having no credentials).
    const first = this.#current;
    queueMicrotask(() => {
      if (this.#identityListeners.has(listener)) listener(identityUpdate(first));
    });
  }

  removeIdentityCertificateListener(listener: IdentityCertificateUpdateListener): void {
    this.#identityListeners.delete(listener);
  }
}

function identityUpdate(tls: ServingTls): IdentityCertificateUpdate {
  return { certificate: tls.cert, privateKey: tls.key };
}

function subject(cert: X509Certificate): string {
  return cert.subject.replace(/\n/g, ", ");
}

function why(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
