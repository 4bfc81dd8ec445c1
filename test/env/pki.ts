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

/** Writes all files into `dir` and returns their paths and the tokens. */
export function makePki(dir: string): Pki {
  const p = (name: string) => join(dir, name);
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
      "/CN=expertmesh-test-ca",
      "-keyout",
      p("ca.key"),
      "-out",
      p("ca.crt"),
    ],
    dir,
  );
  writeFileSync(
    p("serving.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:10.0.0.1\n" +
      "extendedKeyUsage=serverAuth,clientAuth\n",
  );
  openssl(
    [
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      "/CN=kube-apiserver",
      "-keyout",
      p("serving.key"),
      "-out",
      p("serving.csr"),
    ],
    dir,
  );
  openssl(
    [
      "x509",
      "-req",
      "-in",
      p("serving.csr"),
      "-CA",
      p("ca.crt"),
      "-CAkey",
      p("ca.key"),
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      p("serving.ext"),
      "-out",
      p("serving.crt"),
    ],
    dir,
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
