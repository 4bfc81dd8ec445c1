// What `up`'s gateways read of the -f files' Secrets (ADRs 0042, 0043): the API keys
// (spec.gateway.apiKeySecret) and the serving certificate (spec.gateway.tls), written as files
// in the run folder, as the pods mount them. Under `up --watch` an edit of the Secrets in the
// -f files rewrites those files, and the gateways take them without a restart, as the kubelet
// updates a mounted Secret and the pods' gateways read it again. spec.env's valueFrom
// variables are read at start, in a pod as here: a new value starts everything again under
// `up --watch` (src/local/watch.ts), as the operator rolls every role's pods onto it (ADR 0048).
import { join } from "node:path";
import type { DeepSeekModel } from "../api/schema.ts";
import { parseApiKeys } from "../gateway/api-keys.ts";
import { ExpertMeshError } from "../util/errors.ts";
import { writeFileAtomic } from "../util/fs.ts";
import type { LocalObjects } from "./objects.ts";

/** A value read from a -f file's Secret or ConfigMap, and the file. */
export interface FileValue {
  value: string;
  source: string;
}

/** What the gateways read: the keys, and the certificate, its key and the client CA. */
export interface GatewaySecrets {
  apiKeys?: FileValue;
  tls?: { cert: FileValue; key: FileValue; ca?: FileValue };
}

/** The files the gateways read, by name in the run folder. */
const FILES = {
  apiKeys: "api-keys",
  cert: "tls.crt",
  key: "tls.key",
  ca: "client-ca.crt",
} as const;

/**
 * The Secrets' values the gateways read that the -f files hold. EM_GATEWAY_API_KEYS for an
 * API keys Secret holding no key (the gateways would refuse it; the operator reports
 * GatewayAPIKeysInvalid), rather than serve open.
 */
export function gatewaySecrets(m: DeepSeekModel, objects: LocalObjects): GatewaySecrets {
  const out: GatewaySecrets = {};
  const keyRef = m.spec.gateway.apiKeySecret;
  const keys = keyRef && objects.get("Secret", keyRef.name, keyRef.key);
  if (keys) {
    if (parseApiKeys(keys.value).length === 0)
      throw new ExpertMeshError(
        "EM_GATEWAY_API_KEYS",
        `spec.gateway.apiKeySecret: the Secret ${keyRef.name}'s ${keyRef.key} in ${keys.source} holds no API key (give keys separated by commas or line ends)`,
      );
    out.apiKeys = keys;
  }
  const tls = m.spec.gateway.tls;
  if (tls) {
    const cert = objects.get("Secret", tls.secretName, "tls.crt");
    const key = objects.get("Secret", tls.secretName, "tls.key");
    const caRef = tls.clientCASecret;
    const ca = caRef && objects.get("Secret", caRef.name, caRef.key);
    if (cert && key && (ca || !caRef)) out.tls = { cert, key, ...(ca ? { ca } : {}) };
  }
  return out;
}

/** What `up` says at start of the gateways' Secrets: where each came from, or what stands in. */
export function gatewaySecretsNotes(
  m: DeepSeekModel,
  secrets: GatewaySecrets,
  shellKeys: boolean,
): string[] {
  const notes: string[] = [];
  const keyRef = m.spec.gateway.apiKeySecret;
  if (secrets.apiKeys)
    notes.push(
      `spec.gateway.apiKeySecret: the gateways take their keys from ${secrets.apiKeys.source}`,
    );
  else if (keyRef)
    notes.push(
      shellKeys
        ? `spec.gateway.apiKeySecret (${keyRef.name}) is in no -f file: the gateway takes its keys from $EM_API_KEYS here`
        : `spec.gateway.apiKeySecret (${keyRef.name}) is in no -f file: the gateway is open; give the Secret with another -f, or set EM_API_KEYS (comma-separated), to require keys`,
    );
  const tls = m.spec.gateway.tls;
  if (secrets.tls)
    notes.push(
      `spec.gateway.tls: the gateways serve TLS with the certificate in ${secrets.tls.cert.source}${secrets.tls.ca ? `, requiring client certificates its CA signed (${secrets.tls.ca.source})` : ""}`,
    );
  else if (tls)
    notes.push(
      `spec.gateway.tls: ${tls.clientCASecret ? `the Secrets ${tls.secretName} (tls.crt, tls.key) and ${tls.clientCASecret.name} (${tls.clientCASecret.key}) are` : `the Secret ${tls.secretName} (tls.crt, tls.key) is`} in no -f file: the gateways serve plain HTTP and gRPC here (give the Secrets with another -f to serve TLS)`,
    );
  return notes;
}

/**
 * Writes the secrets' files in `dir` (0600; each by a rename, so a gateway never reads half
 * of one) and returns the gateway flags that name them. `version` > 0 names files of their
 * own (api-keys.1, ...), for gateways of an edit that names other Secrets.
 */
export function writeGatewaySecretFiles(
  dir: string,
  secrets: GatewaySecrets,
  version = 0,
): string[] {
  const write = (file: string, text: string) => {
    const path = join(dir, version === 0 ? file : `${file}.${version}`);
    writeFileAtomic(path, text, 0o600);
    return path;
  };
  const args: string[] = [];
  if (secrets.apiKeys) args.push(`--api-keys-file=${write(FILES.apiKeys, secrets.apiKeys.value)}`);
  const { tls } = secrets;
  if (tls) {
    args.push(
      `--tls-cert=${write(FILES.cert, tls.cert.value)}`,
      `--tls-key=${write(FILES.key, tls.key.value)}`,
    );
    if (tls.ca) args.push(`--tls-client-ca=${write(FILES.ca, tls.ca.value)}`);
  }
  return args;
}

/** spec.env's valueFrom variables the -f files hold: name -> value (and file). */
export function envFromObjects(m: DeepSeekModel, objects: LocalObjects): Map<string, FileValue> {
  const out = new Map<string, FileValue>();
  for (const { name, valueFrom } of m.spec.env ?? []) {
    const ref = valueFrom?.secretKeyRef ?? valueFrom?.configMapKeyRef;
    if (!ref) continue;
    const held = objects.get(valueFrom?.secretKeyRef ? "Secret" : "ConfigMap", ref.name, ref.key);
    if (held) out.set(name, held);
  }
  return out;
}

/** What the -f files held, as `up` read them for its gateways. */
export interface SecretsRead {
  gateway: GatewaySecrets;
}

/**
 * What an edit of the -f files does to spec.env's valueFrom variables (`before`: what the
 * processes started with): `changed`, a line per variable with a new value (the processes
 * must start again to take it), and `kept`, a line per variable no -f file holds any more
 * (the processes keep the value they have, as the operator applies nothing while a pod's
 * Secret is missing).
 */
export function envChanges(
  m: DeepSeekModel,
  before: ReadonlyMap<string, FileValue>,
  after: ReadonlyMap<string, FileValue>,
): { changed: string[]; kept: string[] } {
  const changed: string[] = [];
  const kept: string[] = [];
  for (const { name } of m.spec.env ?? []) {
    const [was, now] = [before.get(name), after.get(name)];
    if (now === undefined) {
      if (was !== undefined)
        kept.push(
          `spec.env's ${name}: no -f file holds its Secret or ConfigMap now; the processes keep the value they have`,
        );
    } else if (was?.value !== now.value)
      changed.push(
        was === undefined
          ? `spec.env's ${name}: ${now.source} holds it now`
          : `spec.env's ${name}: its value in ${now.source} changed`,
      );
  }
  return { changed, kept };
}

/**
 * What an edit of the -f files does to the running `up` (the gateways serving with `running`):
 * `running` afterwards (the files to write again, when they changed), and a line per change.
 * New keys or a new certificate reach the gateways (their files are rewritten; the gateways
 * check a certificate and keep the previous one if it does not check out); an API keys
 * Secret that holds no key now, or Secrets no file holds any more, leave the gateways with
 * what they have; Secrets that were not there at start need a restart (spec.env's:
 * `envChanges`).
 */
export function secretsEdit(
  m: DeepSeekModel,
  running: SecretsRead,
  read: SecretsRead,
): { running: SecretsRead; write: boolean; notes: string[] } {
  const notes: string[] = [];
  const gateway: GatewaySecrets = { ...running.gateway };
  let write = false;
  const keyRef = m.spec.gateway.apiKeySecret;
  const [was, now] = [running.gateway.apiKeys, read.gateway.apiKeys];
  if (keyRef && was && !now)
    notes.push(
      `spec.gateway.apiKeySecret: no -f file holds ${keyRef.name}'s ${keyRef.key} now; the gateways keep the keys they have`,
    );
  else if (keyRef && !was && now)
    notes.push(
      `spec.gateway.apiKeySecret: ${now.source} holds ${keyRef.name} now, but the gateways started without keys: stop and start up to require them`,
    );
  else if (was && now && was.value !== now.value) {
    gateway.apiKeys = now;
    write = true;
    notes.push(
      `spec.gateway.apiKeySecret changed in ${now.source}: the gateways take its ${parseApiKeys(now.value).length} key(s) without a restart`,
    );
  }
  const tls = m.spec.gateway.tls;
  const [tlsWas, tlsNow] = [running.gateway.tls, read.gateway.tls];
  if (tls && tlsWas && !tlsNow)
    notes.push(
      `spec.gateway.tls: the -f files no longer hold all of its Secrets; the gateways keep the certificate they have`,
    );
  else if (tls && !tlsWas && tlsNow)
    notes.push(
      `spec.gateway.tls: ${tlsNow.cert.source} holds its Secrets now, but the gateways started serving plain HTTP and gRPC: stop and start up to serve TLS`,
    );
  else if (tlsWas && tlsNow && !sameTls(tlsWas, tlsNow)) {
    gateway.tls = tlsNow;
    write = true;
    notes.push(
      `spec.gateway.tls changed in ${tlsNow.cert.source}: the gateways take the new certificate without a restart (one that does not check out is logged, and the previous one kept)`,
    );
  }
  return { running: { gateway }, write, notes };
}

function sameTls(a: NonNullable<GatewaySecrets["tls"]>, b: NonNullable<GatewaySecrets["tls"]>) {
  return (
    a.cert.value === b.cert.value && a.key.value === b.key.value && a.ca?.value === b.ca?.value
  );
}
