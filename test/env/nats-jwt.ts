// NATS decentralized auth for tests, as nsc makes it: an operator, an account and users as
// NKEYs, their JWTs (ed25519-nkey signed), the .creds files users connect with, and the
// nats-server config lines that trust them (operator mode, a memory resolver).
import { createHash } from "node:crypto";
import { nkeys } from "@nats-io/transport-node";

const b64url = (data: Uint8Array | string) => Buffer.from(data).toString("base64url");
const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** A JWT of `nats` claims about `subject`, issued and signed by `issuer`. */
function jwt(
  issuer: nkeys.KeyPair,
  subject: string,
  name: string,
  nats: Record<string, unknown>,
  expiresInSeconds?: number,
): string {
  const iat = Math.floor(Date.now() / 1000);
  const claims: Record<string, unknown> = {
    iat,
    ...(expiresInSeconds !== undefined ? { exp: iat + expiresInSeconds } : {}),
    iss: issuer.getPublicKey(),
    name,
    sub: subject,
    nats: { ...nats, version: 2 },
  };
  claims["jti"] = createHash("sha256")
    .update(JSON.stringify(claims))
    .digest("base64url")
    .replace(/[^A-Z2-7]/gi, "")
    .toUpperCase()
    .slice(0, 52);
  const body = `${b64url(JSON.stringify({ typ: "JWT", alg: "ed25519-nkey" }))}.${b64url(JSON.stringify(claims))}`;
  return `${body}.${b64url(issuer.sign(new TextEncoder().encode(body)))}`;
}

const NO_LIMITS = { subs: -1, data: -1, payload: -1 };

export interface NatsJwtAuth {
  /** nats-server config lines: operator mode trusting this operator and its account. */
  serverConfig: string[];
  /** A new user of the account: its .creds text (a JWT valid `expiresInSeconds`, if given). */
  user(name: string, expiresInSeconds?: number): string;
  /** A user signed by another operator's account, which the server does not trust. */
  stranger(name: string): string;
}

/** An operator and one account, with users made on demand. */
export function makeNatsJwtAuth(): NatsJwtAuth {
  const operator = nkeys.createOperator();
  const account = nkeys.createAccount();
  const system = nkeys.createAccount();
  const operatorJwt = jwt(operator, operator.getPublicKey(), "expertmesh-test", {
    type: "operator",
  });
  const accountJwt = (acc: nkeys.KeyPair, name: string) =>
    jwt(operator, acc.getPublicKey(), name, {
      type: "account",
      limits: {
        ...NO_LIMITS,
        imports: -1,
        exports: -1,
        wildcards: true,
        conn: -1,
        leaf: -1,
      },
    });
  const creds = (issuer: nkeys.KeyPair, name: string, expiresInSeconds?: number) => {
    const user = nkeys.createUser();
    const token = jwt(
      issuer,
      user.getPublicKey(),
      name,
      { type: "user", pub: {}, sub: {}, ...NO_LIMITS },
      expiresInSeconds,
    );
    return [
      "-----BEGIN NATS USER JWT-----",
      token,
      "------END NATS USER JWT------",
      "",
      "************************* IMPORTANT *************************",
      "NKEY Seed printed below can be used to sign and prove identity.",
      "",
      "-----BEGIN USER NKEY SEED-----",
      text(user.getSeed()),
      "------END USER NKEY SEED------",
      "",
    ].join("\n");
  };
  return {
    serverConfig: [
      `operator: ${operatorJwt}`,
      `system_account: ${system.getPublicKey()}`,
      "resolver: MEMORY",
      "resolver_preload: {",
      `  ${account.getPublicKey()}: ${accountJwt(account, "expertmesh")}`,
      `  ${system.getPublicKey()}: ${accountJwt(system, "SYS")}`,
      "}",
    ],
    user: (name, expiresInSeconds) => creds(account, name, expiresInSeconds),
    stranger: (name) => creds(nkeys.createAccount(), name),
  };
}
