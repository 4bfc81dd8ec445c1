// The gateway's --api-keys-file (spec.gateway.apiKeySecret, mounted; ADR 0043): a real gateway
// process whose keys file is rotated under it, as the kubelet updates a mounted Secret. The
// official openai client and a grpc-js client see the new key accepted and the old refused,
// with no restart; a file emptied keeps the keys it had; a file with no key is refused at
// start.
import { mkdtempSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { credentials, Metadata, status } from "@grpc/grpc-js";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort } from "../env/process.ts";
import { testEnv, waitFor } from "../support/env.ts";
import {
  type GatewayProcess,
  runGatewayToExit,
  startGatewayProcess,
} from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { InferenceClient } from "../support/grpc.ts";

let modelDir: string;
let dir: string;
let keysFile: string;
let gateway: GatewayProcess;
let grpcPort: number;

/** Replaces the keys file by a rename, as the kubelet swaps a Secret volume's files. */
function rotate(text: string) {
  writeFileSync(`${keysFile}.new`, text);
  renameSync(`${keysFile}.new`, keysFile);
}

beforeAll(async () => {
  modelDir = await tinyCheckpointFor("tiny-v3");
  dir = mkdtempSync(join(testEnv().runDir, "gateway-keys-"));
  keysFile = join(dir, "keys");
  writeFileSync(keysFile, "first-key\n");
  grpcPort = await freePort();
  gateway = await startGatewayProcess({
    modelDir,
    namespace: "test",
    modelName: "gateway-keys",
    args: [`--api-keys-file=${keysFile}`, "--api-key=fixed-key", `--grpc-port=${grpcPort}`],
    env: { ...process.env, EM_FILE_RELOAD_INTERVAL_MS: "200" },
  });
});
afterAll(async () => {
  await gateway?.process.stop();
});

/** Whether the HTTP API takes `key` (a 3-token chat with the official client): true, or the error's code. */
async function httpTakes(key: string): Promise<true | string> {
  const client = new OpenAI({ baseURL: `${gateway.url}/v1`, apiKey: key, maxRetries: 0 });
  try {
    await client.chat.completions.create({
      model: "tiny",
      messages: [{ role: "user", content: "Hello!" }],
      max_tokens: 3,
    });
    return true;
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) throw err;
    return `${err.status} ${(err.error as { code?: string } | undefined)?.code}`;
  }
}

/** Whether the gRPC API takes `key` (ModelMetadata): true, or the status code's name. */
function grpcTakes(key: string): Promise<true | string> {
  const stub = new InferenceClient(`127.0.0.1:${grpcPort}`, credentials.createInsecure());
  const md = new Metadata();
  md.set("authorization", `Bearer ${key}`);
  return new Promise((resolve) => {
    stub["ModelMetadata"]!(
      { name: "tiny" },
      md,
      { deadline: Date.now() + 10_000 },
      (err: { code: number } | null) => {
        stub.close();
        resolve(err ? status[err.code]! : true);
      },
    );
  });
}

async function takes(key: string): Promise<[true | string, true | string]> {
  return [await httpTakes(key), await grpcTakes(key)];
}

const refused: [string, string] = ["401 EM_GATEWAY_UNAUTHORIZED", "UNAUTHENTICATED"];

describe("gateway --api-keys-file", () => {
  it("takes a rotated key on both APIs without a restart; the old one is refused, --api-key's stays", async () => {
    expect(await takes("first-key")).toEqual([true, true]);
    expect(await takes("fixed-key")).toEqual([true, true]);
    expect(await takes("second-key")).toEqual(refused);
    expect(gateway.log()).toContain(
      `API keys: 2 accepted, from ${keysFile} too (read again when it changes)`,
    );

    // Rotation: both keys for a while, then the new one alone.
    rotate("first-key,second-key");
    await waitFor(
      "the second key",
      async () => ((await httpTakes("second-key")) === true ? true : undefined),
      10_000,
    );
    expect(await takes("first-key")).toEqual([true, true]);
    rotate("second-key");
    await waitFor(
      "the first key gone",
      async () => ((await httpTakes("first-key")) !== true ? true : undefined),
      10_000,
    );
    expect(await takes("first-key")).toEqual(refused);
    expect(await takes("second-key")).toEqual([true, true]);
    expect(await takes("fixed-key")).toEqual([true, true]);
    expect(gateway.log()).toContain(`API keys reloaded (${keysFile}): 1 key(s), 2 before`);
    // One process served it all.
    expect(gateway.process.exited).toBe(false);
    expect(gateway.log().match(/serving 'tiny' on/g)).toHaveLength(1);
  });

  it("a file changed to no key keeps the keys it had: the gateway never turns open", async () => {
    rotate(" ,\n");
    await waitFor(
      "the refusal logged",
      async () =>
        gateway.log().includes("cannot be used (the previous keys stay)") ? true : undefined,
      10_000,
    );
    expect(await takes("second-key")).toEqual([true, true]);
    expect(await takes("anything")).toEqual(refused);
    rotate("third-key");
    await waitFor(
      "the third key",
      async () => ((await httpTakes("third-key")) === true ? true : undefined),
      10_000,
    );
    expect(await takes("second-key")).toEqual(refused);
  });

  it("refuses at start a file with no key (EM_GATEWAY_API_KEYS) or none at all (EM_CLI_FILE)", async () => {
    const empty = join(dir, "empty");
    writeFileSync(empty, "\n,\n");
    const run = (file: string) => runGatewayToExit(modelDir, [`--api-keys-file=${file}`]);
    const none = await run(empty);
    expect(none.code).not.toBe(0);
    expect(none.stderr).toMatch(/\[EM_GATEWAY_API_KEYS\] --api-keys-file .*empty holds no key/);
    expect(none.stderr).not.toMatch(/loading|serving/);
    const absent = await run(join(dir, "absent"));
    expect(absent.stderr).toMatch(
      /\[EM_CLI_FILE\] --api-keys-file .*absent: cannot read it: no such file/,
    );
  });
});
