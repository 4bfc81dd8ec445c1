// The Secrets a DeepSeekModel names: which ones and which of their keys the pods read, what
// the operator reports before it applies anything (a Secret that is not there, a key it
// lacks), and the NATS identity and TLS the operator's own connection builds from
// spec.nats's (ADRs 0031, 0032). Pure: the reconciler reads the Secrets and hands their contents in.
import { createHash } from "node:crypto";
import type { DeepSeekModel } from "../api/schema.ts";
import { parseApiKeys } from "../gateway/api-keys.ts";
import {
  checkNatsIdentity,
  checkNatsTls,
  type NatsAuth,
  type NatsIdentity,
  secretText,
} from "../moe/nats-connection.ts";
import { ExpertMeshError } from "../util/errors.ts";
import { pemCertificates, pemKeyPair } from "../util/pem.ts";
import type { Problem } from "./status.ts";

/** A Secret a field of the spec names, and the keys the pods (or the operator) read of it. */
export interface SecretRef {
  field: string;
  name: string;
  keys: string[];
  /** The pods start without it (spec.env's `optional`): not a problem when missing. */
  optional?: boolean;
}

/** What reading each named Secret found: its data, decoded, or null when it does not exist. */
export type SecretContents = ReadonlyMap<string, Readonly<Record<string, Buffer>> | null>;

/** Every Secret the model's pods read, in the spec's order. */
export function referencedSecrets(model: DeepSeekModel): SecretRef[] {
  const { huggingFace } = model.spec.model.source;
  const { credentialsSecret, userSecret, tokenSecret, nkeySecret, tls } = model.spec.nats;
  const { apiKeySecret } = model.spec.gateway;
  const refs: SecretRef[] = [];
  const add = (field: string, ref: { name: string; key?: string } | undefined, keys?: string[]) => {
    if (ref) refs.push({ field, name: ref.name, keys: keys ?? [ref.key!] });
  };
  add("spec.model.source.huggingFace.tokenSecret", huggingFace?.tokenSecret);
  add("spec.nats.credentialsSecret", credentialsSecret);
  add("spec.nats.userSecret", userSecret, ["username", "password"]);
  add("spec.nats.tokenSecret", tokenSecret);
  add("spec.nats.nkeySecret", nkeySecret);
  add("spec.nats.tls.caSecret", tls?.caSecret);
  add("spec.nats.tls.clientSecret", tls?.clientSecret, ["tls.crt", "tls.key"]);
  add("spec.gateway.apiKeySecret", apiKeySecret);
  const servingTls = model.spec.gateway.tls;
  if (servingTls) {
    add("spec.gateway.tls.secretName", { name: servingTls.secretName }, ["tls.crt", "tls.key"]);
    add("spec.gateway.tls.clientCASecret", servingTls.clientCASecret);
  }
  return [...refs, ...envRefs(model, "Secret")];
}

/**
 * The keys spec.env reads from Secrets or ConfigMaps (`kind`), in the spec's order: the
 * variable's field, and whether the pods start without it.
 */
export function envRefs(model: DeepSeekModel, kind: "Secret" | "ConfigMap"): SecretRef[] {
  const refs: SecretRef[] = [];
  for (const [i, e] of (model.spec.env ?? []).entries()) {
    const ref = kind === "Secret" ? e.valueFrom?.secretKeyRef : e.valueFrom?.configMapKeyRef;
    if (ref)
      refs.push({
        field: `spec.env[${i}]: ${e.name}`,
        name: ref.name,
        keys: [ref.key],
        ...(ref.optional ? { optional: true } : {}),
      });
  }
  return refs;
}

/**
 * A hash of every value spec.env reads from a Secret or ConfigMap (a missing one counts as
 * missing), or undefined when it reads none: pods whose template carries it roll when a value
 * changes. The values themselves are not in it (SHA-256, cut to 16 hex digits).
 */
export function envSourcesHash(
  model: DeepSeekModel,
  secrets: SecretContents,
  configMaps: SecretContents,
): string | undefined {
  const sources = [
    ...envRefs(model, "Secret").map((r) => ["Secret", r, secrets] as const),
    ...envRefs(model, "ConfigMap").map((r) => ["ConfigMap", r, configMaps] as const),
  ];
  if (sources.length === 0) return undefined;
  const h = createHash("sha256");
  for (const [kind, { name, keys }, contents] of sources) {
    const value = contents.get(name)?.[keys[0]!];
    h.update(`${kind}/${name}/${keys[0]}:`);
    h.update(
      value === undefined ? "missing" : `=${createHash("sha256").update(value).digest("hex")}`,
    );
    h.update("\n");
  }
  return h.digest("hex").slice(0, 16);
}

/**
 * GatewayTLSInvalid when spec.gateway.tls's Secrets hold what every gateway would refuse at
 * start (EM_GATEWAY_TLS): no PEM certificate or key, a key that is not the certificate's, a
 * client CA that is not PEM certificates. Parts whose Secret or key is missing are left out
 * (secretProblems reports them).
 */
export function gatewayTlsProblems(model: DeepSeekModel, contents: SecretContents): Problem[] {
  const tls = model.spec.gateway.tls;
  if (!tls) return [];
  const ns = model.metadata.namespace!;
  const source = (name: string, key: string, field: string) =>
    `Secret ${ns}/${name}'s ${key} (spec.gateway.tls.${field})`;
  const problems: Problem[] = [];
  const check = (run: () => void) => {
    try {
      run();
    } catch (err) {
      if (!(err instanceof ExpertMeshError)) throw err;
      problems.push({ reason: "GatewayTLSInvalid", message: err.message });
    }
  };
  const serving = contents.get(tls.secretName);
  const [cert, key] = [serving?.["tls.crt"], serving?.["tls.key"]];
  if (cert && key)
    check(() =>
      pemKeyPair(
        { cert, key },
        {
          cert: source(tls.secretName, "tls.crt", "secretName"),
          key: source(tls.secretName, "tls.key", "secretName"),
        },
        "EM_GATEWAY_TLS",
      ),
    );
  const ca = tls.clientCASecret;
  const caPem = ca && contents.get(ca.name)?.[ca.key];
  if (ca && caPem)
    check(() =>
      pemCertificates(caPem, source(ca.name, ca.key, "clientCASecret"), "EM_GATEWAY_TLS"),
    );
  return problems;
}

/**
 * GatewayAPIKeysInvalid when spec.gateway.apiKeySecret's key holds no key (only commas,
 * blanks): every gateway would refuse its --api-keys-file at start (EM_GATEWAY_API_KEYS)
 * rather than serve with no key. A Secret or key that is missing is left out (secretProblems).
 */
export function gatewayApiKeysProblems(model: DeepSeekModel, contents: SecretContents): Problem[] {
  const ref = model.spec.gateway.apiKeySecret;
  const value = ref && contents.get(ref.name)?.[ref.key];
  if (!ref || value === undefined || parseApiKeys(value.toString("utf8")).length > 0) return [];
  return [
    {
      reason: "GatewayAPIKeysInvalid",
      message: `Secret ${model.metadata.namespace}/${ref.name}'s ${ref.key} (spec.gateway.apiKeySecret) holds no API key: give keys separated by commas or line ends`,
    },
  ];
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
  return sourceProblems("Secret", namespace, refs, contents);
}

/** ConfigMapNotFound and ConfigMapKeyMissing for spec.env's ConfigMap keys, as secretProblems. */
export function configMapProblems(
  namespace: string,
  refs: SecretRef[],
  contents: SecretContents,
): Problem[] {
  return sourceProblems("ConfigMap", namespace, refs, contents);
}

function sourceProblems(
  kind: "Secret" | "ConfigMap",
  namespace: string,
  refs: SecretRef[],
  contents: SecretContents,
): Problem[] {
  const problems: Problem[] = [];
  for (const { field, name, keys, optional } of refs) {
    const data = contents.get(name);
    if (data === undefined || optional) continue; // not read: nothing known; or not needed
    if (data === null) {
      problems.push({
        reason: `${kind}NotFound`,
        message: `${kind} ${namespace}/${name} (${field}) does not exist`,
      });
      continue;
    }
    const missing = keys.filter((k) => data[k] === undefined);
    if (missing.length)
      problems.push({
        reason: `${kind}KeyMissing`,
        message: `${kind} ${namespace}/${name} (${field}) has no key ${missing.join(", ")}`,
      });
  }
  return problems;
}

/**
 * spec.nats's identity and TLS as the operator's own connections use them (the autoscaler's
 * load reports, plan changes, the JetStream check), from what is there. Contents every pod
 * would refuse at start are problems: NATSAuthInvalid (EM_NATS_AUTH: an empty password or
 * token, no NKEY user seed, a .creds without its JWT and seed) and NATSTLSInvalid
 * (EM_NATS_TLS: no PEM certificate and key). Parts whose Secret or key is missing are left
 * out (secretProblems reports them).
 */
export function natsAuthOf(
  model: DeepSeekModel,
  contents: SecretContents,
): { auth?: NatsAuth; problems: Problem[] } {
  const { tls } = model.spec.nats;
  const ns = model.metadata.namespace!;
  const value = (name: string, key: string) => contents.get(name)?.[key];
  const source = (name: string, key: string, field: string) =>
    `Secret ${ns}/${name}'s ${key} (spec.nats.${field})`;
  const auth: NatsAuth = {};
  const problems: Problem[] = [];
  const check = (reason: Problem["reason"], run: () => void): boolean => {
    try {
      run();
      return true;
    } catch (err) {
      if (!(err instanceof ExpertMeshError)) throw err;
      problems.push({ reason, message: err.message });
      return false;
    }
  };
  const identity = natsIdentityOf(model, value);
  if (identity) {
    const { credentialsSecret: c, userSecret: u, tokenSecret: t, nkeySecret: n } = model.spec.nats;
    const sources = {
      ...(c ? { creds: source(c.name, c.key, "credentialsSecret") } : {}),
      ...(u
        ? {
            user: source(u.name, "username", "userSecret"),
            password: source(u.name, "password", "userSecret"),
          }
        : {}),
      ...(t ? { token: source(t.name, t.key, "tokenSecret") } : {}),
      ...(n ? { nkey: source(n.name, n.key, "nkeySecret") } : {}),
    };
    if (check("NATSAuthInvalid", () => checkNatsIdentity(identity, sources)))
      auth.identity = identity;
  }
  if (tls) {
    auth.tls = {};
    const sources = { ca: "", cert: "", key: "" };
    if (tls.caSecret) {
      const { name, key } = tls.caSecret;
      auth.tls.ca = value(name, key)?.toString("utf8");
      sources.ca = source(name, key, "tls.caSecret");
    }
    if (tls.clientSecret) {
      const { name } = tls.clientSecret;
      const [cert, key] = [value(name, "tls.crt"), value(name, "tls.key")];
      if (cert && key)
        [auth.tls.cert, auth.tls.key] = [cert.toString("utf8"), key.toString("utf8")];
      sources.cert = source(name, "tls.crt", "tls.clientSecret");
      sources.key = source(name, "tls.key", "tls.clientSecret");
    }
    check("NATSTLSInvalid", () => checkNatsTls(auth.tls!, sources));
  }
  return { ...(auth.identity || auth.tls ? { auth } : {}), problems };
}

/** The identity spec.nats names, from its Secret's contents; none while they are missing. */
function natsIdentityOf(
  model: DeepSeekModel,
  value: (name: string, key: string) => Buffer | undefined,
): NatsIdentity | undefined {
  const { credentialsSecret: c, userSecret: u, tokenSecret: t, nkeySecret: n } = model.spec.nats;
  if (c) {
    const creds = value(c.name, c.key);
    return creds && { kind: "creds", creds };
  }
  if (u) {
    const [user, password] = [value(u.name, "username"), value(u.name, "password")];
    return user && password
      ? { kind: "user", user: secretText(user), password: secretText(password) }
      : undefined;
  }
  if (t) {
    const token = value(t.name, t.key);
    return token && { kind: "token", token: secretText(token) };
  }
  if (n) {
    const seed = value(n.name, n.key);
    return seed && { kind: "nkey", seed };
  }
  return undefined;
}
