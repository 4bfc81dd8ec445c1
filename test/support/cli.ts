// Runs the test environment's command-line tools (kubectl, helm) against the test cluster.
import { execFile } from "node:child_process";
import { testEnv } from "./env.ts";

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `binary args` (stdin from `input`); never throws for a non-zero exit. */
export function runCli(
  binary: string,
  args: string[],
  input?: string,
  env?: NodeJS.ProcessEnv,
): Promise<CliResult> {
  return new Promise((resolve) => {
    const child = execFile(
      binary,
      args,
      { env: env ?? process.env, maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        resolve({ code: typeof code === "number" ? code : 1, stdout, stderr });
      },
    );
    if (input !== undefined) child.stdin?.end(input);
  });
}

/** kubectl as the admin identity. */
export function kubectl(args: string[], input?: string): Promise<CliResult> {
  const env = testEnv();
  return runCli(env.binaries.kubectl, ["--kubeconfig", env.kube.kubeconfig, ...args], input);
}
