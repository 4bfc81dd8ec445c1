// The Secrets a DeepSeekModel names: which ones and which of their keys the pods read, what
// the operator reports before it applies anything (a Secret that is not there, a key it
// lacks), and the NATS credentials and TLS the operator's own connection builds from
// spec.nats's (ADR 0031). Pure: the reconciler reads the Secrets and hands their contents in.
import type { DeepSeekModel } from "../api/schema.ts";
import { checkNatsTls, type NatsAuth } from "../moe/nats-connection.ts";
import { ExpertMeshError } from "../util/errors.ts";
import type { Problem } from "./status.ts";

/** A Secret a field of the spec names, and the keys the pods (or the operator) read of it. */
export interface SecretRef {
  field: string;
  name: string;
  keys: string[];
}

/** What reading each named Secret found: its data, decoded, or null when it does not exist. */
export type SecretContents = ReadonlyMap<string, Readonly<Record<string, Buffer>> | null>;

/** Every Secret the model's pods read, in the spec's order. */
export function referencedSecrets(model: DeepSeekModel): SecretRef[] {
  const { huggingFace } = model.spec.model.source;
  const { credentialsSecret, tls } = model.spec.nats;
  const { apiKeySecret } = model.spec.gateway;
  const refs: SecretRef[] = [];
  const add = (field: string, ref: { name: string; key?: string } | undefined, keys?: string[]) => {
    if (ref) refs.push({ field, name: ref.name, keys: keys ?? [ref.key!] });
  };
  add("spec.model.source.huggingFace.tokenSecret", huggingFace?.tokenSecret);
  add("spec.nats.credentialsSecret", credentialsSecret);
  add("spec.nats.tls.caSecret", tls?.caSecret);
  add("spec.nats.tls.clientSecret", tls?.clientSecret, ["tls.crt", "tls.key"]);
  add("spec.gateway.apiKeySecret", apiKeySecret);
  return refs;
}

/**
 * SecretNotFound for each reference to a Secret that is not there, SecretKeyMissing for one
 * that lacks a key it is read by: either way the pods would not start (a missing key of an
 * env var's secretKeyRef stops the container; a mounted file that is not there, the process).
 */
export function secretProblems(
  namespace: string,
  refs: SecretRef[],
  contents: SecretContents,
): Problem[] {
  const problems: Problem[] = [];
  for (const { field, name, keys } of refs) {
    const data = contents.get(name);
    if (data === undefined) continue; // not read: nothing known
    if (data === null) {
      problems.push({
        reason: "SecretNotFound",
        message: `Secret ${namespace}/${name} (${field}) does not exist`,
      });
      continue;
    }
    const missing = keys.filter((k) => data[k] === undefined);
    if (missing.length)
      problems.push({
        reason: "SecretKeyMissing",
        message: `Secret ${namespace}/${name} (${field}) has no key ${missing.join(", ")}`,
      });
  }
  return problems;
}

/**
 * spec.nats's credentials and TLS as the operator's own connections use them (the
 * autoscaler's load reports, plan changes, the JetStream check), from what is there; TLS
 * contents that are no PEM certificate and key are NATSTLSInvalid: every pod would refuse
 * them at start (EM_NATS_TLS). Parts whose Secret or key is missing are left out
 * (secretProblems reports them).
 */
export function natsAuthOf(
  model: DeepSeekModel,
  contents: SecretContents,
): { auth?: NatsAuth; problems: Problem[] } {
  const { credentialsSecret: credsRef, tls } = model.spec.nats;
  const ns = model.metadata.namespace!;
  const value = (name: string, key: string) => contents.get(name)?.[key];
  const auth: NatsAuth = {};
  if (credsRef) {
    const creds = value(credsRef.name, credsRef.key);
    if (creds) auth.creds = creds;
  }
  const problems: Problem[] = [];
  if (tls) {
    auth.tls = {};
    const sources = { ca: "", cert: "", key: "" };
    if (tls.caSecret) {
      const { name, key } = tls.caSecret;
      auth.tls.ca = value(name, key)?.toString("utf8");
      sources.ca = `Secret ${ns}/${name}'s ${key} (spec.nats.tls.caSecret)`;
    }
    if (tls.clientSecret) {
      const { name } = tls.clientSecret;
      const [cert, key] = [value(name, "tls.crt"), value(name, "tls.key")];
      if (cert && key)
        [auth.tls.cert, auth.tls.key] = [cert.toString("utf8"), key.toString("utf8")];
      sources.cert = `Secret ${ns}/${name}'s tls.crt (spec.nats.tls.clientSecret)`;
      sources.key = `Secret ${ns}/${name}'s tls.key (spec.nats.tls.clientSecret)`;
    }
    try {
      checkNatsTls(auth.tls, sources);
    } catch (err) {
      if (!(err instanceof ExpertMeshError)) throw err;
      problems.push({ reason: "NATSTLSInvalid", message: err.message });
    }
  }
  return { ...(auth.creds || auth.tls ? { auth } : {}), problems };
}
