// The pure parts of who a process is to NATS (ADR 0032): what checkNatsIdentity refuses, the
// flags that give an identity, credentials in a URL, and the authenticators nats.js gets,
// which read their files again at each handshake. Real servers: test/moe/nats-auth.test.ts.
import { mkdtempSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nkeys } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { natsAuthFlags } from "../../src/cli/options.ts";
import {
  checkNatsIdentity,
  checkNatsUrlCredentials,
  connectFailure,
  type NatsIdentity,
  natsConnectOptions,
  secretText,
} from "../../src/moe/nats-connection.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";
import { makeNatsJwtAuth } from "../env/nats-jwt.ts";

const enc = (s: string) => new TextEncoder().encode(s);
const user = nkeys.createUser();
const seed = new TextDecoder().decode(user.getSeed());
const creds = makeNatsJwtAuth().user("alice");
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), "em-nats-auth-"));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const file = (name: string, text: string) => {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
};

/** The EM_* code and message a call throws, or undefined. */
function thrown(f: () => unknown): string | undefined {
  try {
    f();
    return undefined;
  } catch (err) {
    if (!(err instanceof ExpertMeshError)) throw err;
    return `${err.code}: ${err.message}`;
  }
}

describe("secretText", () => {
  it.each([
    ["pw\n", "pw"],
    ["pw\r\n", "pw"],
    ["pw\n\n", "pw"],
    [" pw ", " pw "],
    ["p\nw", "p\nw"],
    ["", ""],
  ])("%j -> %j", (input, want) => {
    expect(secretText(input)).toBe(want);
    expect(secretText(enc(input))).toBe(want);
  });
});

describe("checkNatsIdentity", () => {
  const from = { creds: "CREDS", user: "USER", password: "PASSWORD", token: "TOKEN", nkey: "NKEY" };
  it.each<[string, NatsIdentity, RegExp | undefined]>([
    ["a .creds file as nsc writes it", { kind: "creds", creds: enc(creds) }, undefined],
    [
      "a .creds file without its seed",
      { kind: "creds", creds: enc(creds.slice(0, creds.indexOf("-----BEGIN USER NKEY"))) },
      /^CREDS is not a NATS \.creds file: it lacks the user's seed/,
    ],
    [
      "text that is no .creds",
      { kind: "creds", creds: enc("nope") },
      /^CREDS is not a NATS \.creds file: it lacks the user JWT/,
    ],
    ["a user and a password", { kind: "user", user: "alice", password: " p w " }, undefined],
    ["an empty user", { kind: "user", user: "", password: "pw" }, /^USER is empty$/],
    [
      "a user of two words",
      { kind: "user", user: "al ice", password: "pw" },
      /^USER holds white space/,
    ],
    ["an empty password", { kind: "user", user: "a", password: "" }, /^PASSWORD is empty$/],
    ["a token", { kind: "token", token: "t" }, undefined],
    ["an empty token", { kind: "token", token: "" }, /^TOKEN is empty$/],
    ["a user seed", { kind: "nkey", seed: enc(seed) }, undefined],
    ["a user seed and a line end", { kind: "nkey", seed: enc(`${seed}\n`) }, undefined],
    [
      "a public key",
      { kind: "nkey", seed: enc(user.getPublicKey()) },
      /^NKEY is not an NKEY user seed: it must start with SU/,
    ],
    [
      "an account's seed",
      { kind: "nkey", seed: nkeys.createAccount().getSeed() },
      /^NKEY is not an NKEY user seed: it must start with SU/,
    ],
    [
      "a damaged seed",
      { kind: "nkey", seed: enc(`${seed.slice(0, -4)}AAAA`) },
      /^NKEY is not an NKEY user seed: \S/,
    ],
  ])("%s", (_, identity, want) => {
    const got = thrown(() => checkNatsIdentity(identity, from));
    if (want === undefined) expect(got).toBeUndefined();
    else {
      expect(got).toMatch(/^EM_NATS_AUTH: /);
      expect(got!.replace(/^EM_NATS_AUTH: /, "")).toMatch(want);
    }
  });
});

describe("checkNatsUrlCredentials", () => {
  it.each<[string, boolean]>([
    ["nats://127.0.0.1:4222", false],
    ["tls://nats.example:4222", false],
    ["nats://nats:4222,nats://other:4222", false],
    ["nats://alice:secret@nats:4222", true],
    ["tls://t0ken@nats:4222", true],
    ["  NATS://a:b@h", true],
    ["nats://h:4222/x@y", false], // an @ past the host is no user part
  ])("%s: refused %s", (url, refused) => {
    const got = thrown(() => checkNatsUrlCredentials(url));
    if (!refused) return expect(got).toBeUndefined();
    expect(got).toMatch(/^EM_NATS_AUTH: the NATS URL \S+:\/\/\*\*\*@\S* holds credentials/);
    expect(got).not.toMatch(/secret|t0ken|a:b/);
  });
});

describe("natsAuthFlags", () => {
  it("reads the identity the flags give, without line ends, and keeps the files' paths", () => {
    const pw = file("pw", "s3cret\n");
    expect(natsAuthFlags({ "nats-user": "alice", "nats-password-file": pw })).toEqual({
      identity: {
        kind: "user",
        user: "alice",
        password: "s3cret",
        files: { user: undefined, password: pw },
      },
    });
    const name = file("user", "bob\r\n");
    expect(natsAuthFlags({ "nats-user-file": name, "nats-password-file": pw })?.identity).toEqual({
      kind: "user",
      user: "bob",
      password: "s3cret",
      files: { user: name, password: pw },
    });
    const token = file("token", "tok\n");
    expect(natsAuthFlags({ "nats-token-file": token })).toEqual({
      identity: { kind: "token", token: "tok", file: token },
    });
    const nk = file("user.nk", `${seed}\n`);
    const got = natsAuthFlags({ "nats-nkey": nk })?.identity;
    expect(got?.kind === "nkey" && secretText(got.seed)).toBe(seed);
    expect(natsAuthFlags({ nats: "nats://h:4222" })).toBeUndefined();
  });

  it.each<[string, Record<string, string>, RegExp]>([
    [
      "two kinds",
      { "nats-token-file": "T", "nats-nkey": "N" },
      /^EM_NATS_AUTH: --nats-token-file, --nats-nkey: a NATS connection authenticates one way/,
    ],
    [
      "a user and .creds",
      { "nats-user": "a", "nats-password-file": "P", "nats-creds": "C" },
      /^EM_NATS_AUTH: --nats-creds, --nats-user\/--nats-password-file: a NATS connection/,
    ],
    [
      "the user twice",
      { "nats-user": "a", "nats-user-file": "U", "nats-password-file": "P" },
      /^EM_NATS_AUTH: --nats-user and --nats-user-file both name the NATS user/,
    ],
    ["a user alone", { "nats-user-file": "U" }, /^EM_NATS_AUTH: a NATS user needs its password/],
    [
      "a password alone",
      { "nats-password-file": "P" },
      /^EM_NATS_AUTH: --nats-password-file needs the user/,
    ],
    [
      "credentials in the URL",
      { nats: "nats://a:hunter2@h:4222" },
      /^EM_NATS_AUTH: the NATS URL nats:\/\/\*\*\*@h:4222 holds credentials/,
    ],
    [
      "a file not there",
      { "nats-token-file": "/nonexistent/t" },
      /^EM_CLI_FILE: --nats-token-file/,
    ],
  ])("refuses %s", (_, values, want) => {
    const resolved = Object.fromEntries(
      Object.entries(values).map(([k, v]) => [k, /^[A-Z]$/.test(v) ? file(v, "x") : v]),
    );
    expect(thrown(() => natsAuthFlags(resolved))).toMatch(want);
  });
});

describe("natsConnectOptions' authenticators", () => {
  it("read their files again at each handshake, keeping the last good value when a file is gone or empty", () => {
    const pw = file("rotating-pw", "one\n");
    const auth = natsConnectOptions("nats://h:4222", {
      identity: { kind: "user", user: "a", password: "checked", files: { password: pw } },
    }).authenticator!;
    expect(auth()).toEqual({ user: "a", pass: "one" });
    writeFileSync(pw, "two");
    expect(auth()).toEqual({ user: "a", pass: "two" });
    writeFileSync(pw, "\n");
    expect(auth()).toEqual({ user: "a", pass: "two" });
    unlinkSync(pw);
    expect(auth()).toEqual({ user: "a", pass: "two" });
    // No file: the value checked at start.
    const fixed = natsConnectOptions("nats://h", {
      identity: { kind: "token", token: "tok" },
    }).authenticator!;
    expect(fixed()).toEqual({ auth_token: "tok" });
  });

  it("sign the server's nonce with the NKEY seed, and with a .creds file's seed beside its JWT", () => {
    const nonce = "n0nce";
    const nk = file("nonce.nk", `${seed}\n`);
    const byNkey = natsConnectOptions("nats://h", {
      identity: { kind: "nkey", seed: enc(`${seed}\n`), file: nk },
    }).authenticator!(nonce) as { nkey: string; sig: string };
    expect(byNkey.nkey).toBe(user.getPublicKey());
    expect(
      nkeys.fromPublic(byNkey.nkey).verify(enc(nonce), Buffer.from(byNkey.sig, "base64")),
    ).toBe(true);
    const byCreds = natsConnectOptions("nats://h", {
      identity: { kind: "creds", creds: enc(creds) },
    }).authenticator!(nonce) as { jwt: string; nkey: string; sig: string };
    expect(byCreds.jwt).toBe(creds.split("\n")[1]);
    expect(
      nkeys.fromPublic(byCreds.nkey).verify(enc(nonce), Buffer.from(byCreds.sig, "base64")),
    ).toBe(true);
  });
});

describe("connectFailure", () => {
  it("tells credentials refused what to give", () => {
    const err = Object.assign(new Error("Authorization Violation"), { name: "AuthorizationError" });
    expect(connectFailure(err, false)).toMatch(
      /^the server refused this connection's credentials \(Authorization Violation\): give the ones it knows \(--nats-user/,
    );
  });
});
