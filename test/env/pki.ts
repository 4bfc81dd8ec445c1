// Throwaway certificates and credentials for the test control plane, made with openssl:
// a CA, a serving certificate for 127.0.0.1/localhost, a service-account signing key pair
// and a static token file (an admin in system:masters plus the control-plane components).
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export interface Pki {
  caCert: string;
  caKey: string;
  servingCert: string;
  servingKey: string;
  saKey: string;
  saPub: string;
  tokenFile: string;
  /** Bearer tokens per identity. */
  tokens: {
    admin: string;
    controllerManager: string;
    scheduler: string;
    /** An authenticated user with no RBAC grants at all. */
    nobody: string;
  };
}

function openssl(args: string[], cwd: string): void {
  execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
}

/** A self-signed CA, `<name>.crt` and `<name>.key` in `dir`. */
function makeCa(dir: string, name: string, subject: string): { cert: string; key: string } {
  const cert = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  openssl(
    [
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "2",
      "-subj",
      subject,
      "-keyout",
      key,
      "-out",
      cert,
    ],
    dir,
  );
  return { cert, key };
}

/** A key pair and a certificate `ca` signed, with the extensions in `ext` (openssl's syntax). */
function makeCert(
  dir: string,
  name: string,
  subject: string,
  ca: { cert: string; key: string },
  ext: string,
  newkey: string[] = ["-newkey", "rsa:2048"],
): { cert: string; key: string } {
  const p = (suffix: string) => join(dir, `${name}.${suffix}`);
  writeFileSync(p("ext"), ext);
  openssl(
    ["req", ...newkey, "-nodes", "-subj", subject, "-keyout", p("key"), "-out", p("csr")],
    dir,
  );
  openssl(
    [
      "x509",
      "-req",
      "-in",
      p("csr"),
      "-CA",
      ca.cert,
      "-CAkey",
      ca.key,
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      p("ext"),
      "-out",
      p("crt"),
    ],
    dir,
  );
  return { cert: p("crt"), key: p("key") };
}

/** Writes all files into `dir` and returns their paths and the tokens. */
export function makePki(dir: string): Pki {
  const p = (name: string) => join(dir, name);
  const ca = makeCa(dir, "ca", "/CN=expertmesh-test-ca");
  makeCert(
    dir,
    "serving",
    "/CN=kube-apiserver",
    ca,
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:10.0.0.1\n" +
      "extendedKeyUsage=serverAuth,clientAuth\n",
  );
  openssl(["genrsa", "-out", p("sa.key"), "2048"], dir);
  openssl(["rsa", "-in", p("sa.key"), "-pubout", "-out", p("sa.pub")], dir);

  const token = () => randomBytes(24).toString("hex");
  const tokens = {
    admin: token(),
    controllerManager: token(),
    scheduler: token(),
    nobody: token(),
  };
  // token,user,uid,"group1,group2"
  writeFileSync(
    p("tokens.csv"),
    [
      `${tokens.admin},admin,admin,"system:masters"`,
      `${tokens.controllerManager},system:kube-controller-manager,kcm`,
      `${tokens.scheduler},system:kube-scheduler,scheduler`,
      `${tokens.nobody},nobody,nobody`,
      "",
    ].join("\n"),
  );
  return {
    caCert: p("ca.crt"),
    caKey: p("ca.key"),
    servingCert: p("serving.crt"),
    servingKey: p("serving.key"),
    saKey: p("sa.key"),
    saPub: p("sa.pub"),
    tokenFile: p("tokens.csv"),
    tokens,
  };
}

/** A kubeconfig file for one bearer-token identity against `server`. */
export function writeKubeconfig(
  path: string,
  server: string,
  caCertPath: string,
  user: string,
  token: string,
): void {
  const ca = readFileSync(caCertPath).toString("base64");
  writeFileSync(
    path,
    [
      "apiVersion: v1",
      "kind: Config",
      "clusters:",
      "- name: expertmesh-test",
      "  cluster:",
      `    server: ${server}`,
      `    certificate-authority-data: ${ca}`,
      "users:",
      `- name: ${user}`,
      "  user:",
      `    token: ${token}`,
      "contexts:",
      `- name: ${user}@expertmesh-test`,
      "  context:",
      "    cluster: expertmesh-test",
      `    user: ${user}`,
      "    namespace: default",
      `current-context: ${user}@expertmesh-test`,
      "",
    ].join("\n"),
    { mode: 0o600 },
  );
}

/** Certificates for NATS over TLS (PEM file paths). */
export interface NatsPki {
  /** The CA that signed the server's and the client's certificates. */
  ca: string;
  /** The server's, for 127.0.0.1 and localhost. */
  server: { cert: string; key: string };
  /** The server's, for another name only (nats.invalid): a client at 127.0.0.1 refuses it. */
  elsewhere: { cert: string; key: string };
  /** A client certificate the CA signed (mutual TLS). */
  client: { cert: string; key: string };
  /** Another CA, that signed nothing the server has. */
  otherCa: string;
  /** A client certificate otherCa signed (a rotation to a new client CA). */
  otherClient: { cert: string; key: string };
  /**
   * A route's, for the servers of a cluster (127.0.0.1 and localhost; the CA signed it):
   * good for server and client auth, since a route's two ends each check the other's.
   */
  route: { cert: string; key: string };
  /** As `server`, with an ECDSA P-256 key instead of RSA 2048. */
  serverEcdsa: { cert: string; key: string };
}

/** Writes a CA, server and client certificates for a nats-server with TLS into `dir`. */
export function makeNatsPki(dir: string): NatsPki {
  const ca = makeCa(dir, "nats-ca", "/CN=expertmesh-test-nats-ca");
  const server = "extendedKeyUsage=serverAuth\n";
  const clientExt = "extendedKeyUsage=clientAuth\n";
  const otherCa = makeCa(dir, "other-ca", "/CN=some-other-ca");
  return {
    ca: ca.cert,
    server: makeCert(
      dir,
      "nats-server",
      "/CN=nats",
      ca,
      `subjectAltName=IP:127.0.0.1,DNS:localhost\n${server}`,
    ),
    elsewhere: makeCert(
      dir,
      "nats-elsewhere",
      "/CN=nats.invalid",
      ca,
      `subjectAltName=DNS:nats.invalid\n${server}`,
    ),
    client: makeCert(dir, "nats-client", "/CN=expertmesh", ca, clientExt),
    otherCa: otherCa.cert,
    otherClient: makeCert(dir, "other-client", "/CN=expertmesh-next", otherCa, clientExt),
    route: makeCert(
      dir,
      "nats-route",
      "/CN=nats-route",
      ca,
      "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    ),
    serverEcdsa: makeCert(
      dir,
      "nats-server-ecdsa",
      "/CN=nats",
      ca,
      `subjectAltName=IP:127.0.0.1,DNS:localhost\n${server}`,
      ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    ),
  };
}
