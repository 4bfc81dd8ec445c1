// Runs `expertmesh gateway` as a real process (distributed mode over the test nats-server):
// what a gateway pod runs, with its load reports and live plan switching.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";
import { ManagedProcess } from "../env/process.ts";
import { type CliResult, runCli } from "./cli.ts";
import { testEnv } from "./env.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));

export interface GatewayProcess {
  process: ManagedProcess;
  url: string;
  client: OpenAI;
  log(): string;
}

/** Distributed mode with `planPath`; without it, --local (experts in the process). */
export async function startGatewayProcess(o: {
  modelDir: string;
  planPath?: string;
  /** The NATS server of distributed mode (default: the test nats-server). */
  natsUrl?: string;
  namespace: string;
  modelName: string;
  args?: string[];
  /** The process's environment (default: this one's). */
  env?: NodeJS.ProcessEnv;
  /** Its name (log file), for several gateways of one model (default gateway-<ns>-<model>). */
  name?: string;
}): Promise<GatewayProcess> {
  const proc = new ManagedProcess(
    o.name ?? `gateway-${o.namespace}-${o.modelName}`,
    process.execPath,
    [
      mainTs,
      "gateway",
      `--model=${o.modelDir}`,
      ...(o.planPath === undefined
        ? ["--local"]
        : [`--plan=${o.planPath}`, `--nats=${o.natsUrl ?? testEnv().nats.url}`]),
      `--namespace=${o.namespace}`,
      `--model-name=${o.modelName}`,
      "--served-model-name=tiny",
      "--host=127.0.0.1",
      "--http-port=0",
      "--metrics-port=0",
      ...(o.args ?? []),
    ],
    join(testEnv().runDir, "logs"),
    o.env,
  );
  const log = () => readFileSync(proc.logPath, "utf8");
  let url = "";
  await proc.waitUntil(
    "serving",
    async () => {
      const m = /serving '.*' on (https?:\/\/[\d.]+:\d+)/.exec(log());
      if (m) url = m[1]!;
      return m !== null;
    },
    60_000,
  );
  return {
    process: proc,
    url,
    client: new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 }),
    log,
  };
}

/**
 * `expertmesh gateway --local` on `modelDir` with `args`, run to its exit (a gateway that
 * refuses its flags before serving): its exit code and output.
 */
export function runGatewayToExit(modelDir: string, args: string[]): Promise<CliResult> {
  return runCli(process.execPath, [
    mainTs,
    "gateway",
    `--model=${modelDir}`,
    "--local",
    "--http-port=0",
    "--metrics-port=0",
    ...args,
  ]);
}

/**
 * A decode and a prefill gateway process of one model (--disaggregation-mode, ADR 0029) over
 * the test nats-server, sharing the NATS tier in `bucket`; `args` go to both.
 */
export async function startDisaggregatedPair(o: {
  modelDir: string;
  modelName: string;
  bucket: string;
  blockSize: number;
  /** The decode gateway's --disaggregation-min-tokens. */
  minTokens: number;
  args?: string[];
}): Promise<{ decode: GatewayProcess; prefill: GatewayProcess }> {
  const [decode, prefill] = await Promise.all(
    (["decode", "prefill"] as const).map((mode) =>
      startGatewayProcess({
        modelDir: o.modelDir,
        namespace: "test",
        modelName: o.modelName,
        name: `gateway-${o.modelName}-${mode}`,
        args: [
          `--nats=${testEnv().nats.url}`,
          `--prefix-cache-remote=${o.bucket}`,
          "--prefix-cache-remote-bytes=8388608",
          `--block-size=${o.blockSize}`,
          `--disaggregation-mode=${mode}`,
          ...(mode === "decode" ? [`--disaggregation-min-tokens=${o.minTokens}`] : []),
          ...(o.args ?? []),
        ],
      }),
    ),
  );
  return { decode: decode!, prefill: prefill! };
}
