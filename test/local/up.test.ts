// `expertmesh up -f examples/tiny.yaml` end to end: it creates the tiny model, starts a
// nats-server, four shard processes and the gateway, serves the official openai client,
// and Ctrl-C stops every process it started.
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";
import { afterAll, describe, expect, it } from "vitest";
import { freePort } from "../env/process.ts";
import { testEnv, waitFor } from "../support/env.ts";

const root = fileURLToPath(new URL("../../", import.meta.url));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe("expertmesh up", () => {
  let up: ReturnType<typeof spawn> | undefined;
  afterAll(() => {
    if (up && up.exitCode === null) up.kill("SIGKILL");
  });

  it("serves the tiny manifest locally and stops everything on Ctrl-C", async () => {
    const port = await freePort();
    const models = mkdtempSync(join(testEnv().runDir, "models-"));
    up = spawn(
      process.execPath,
      [
        join(root, "src/cli/main.ts"),
        "up",
        "-f",
        join(root, "examples/tiny.yaml"),
        `--models-dir=${models}`,
        `--http-port=${port}`,
      ],
      {
        env: { ...process.env, EXPERTMESH_NATS_SERVER: testEnv().binaries.natsServer },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    let out = "";
    let err = "";
    up.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    up.stderr!.on("data", (d: Buffer) => (err += d.toString()));
    await waitFor(
      "the endpoint",
      async () => (out.includes(`http://127.0.0.1:${port}/v1`) ? true : undefined),
      90_000,
    ).catch((e) => {
      throw new Error(`${e}\n${err.slice(-3000)}`);
    });
    expect(err).toContain("creating the tiny-v3 model");
    expect(err).toMatch(/\[shard-3\.0\] .*serving/);

    const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused" });
    const chat = await client.chat.completions.create({
      model: "tiny-v3",
      messages: [{ role: "user", content: "Hello!" }],
      max_tokens: 8,
      temperature: 0,
    });
    expect(chat.choices[0]!.finish_reason).toBe("length");
    expect(chat.usage?.completion_tokens).toBe(8);

    const children = execFileSync("pgrep", ["-P", String(up.pid)])
      .toString()
      .trim()
      .split("\n")
      .map(Number);
    expect(children.length).toBe(6); // nats-server, 4 shards, the gateway
    up.kill("SIGINT");
    await waitFor("up to exit", async () => (up!.exitCode !== null ? true : undefined), 30_000);
    expect(up.exitCode).toBe(0);
    for (const pid of children) expect(alive(pid), `child ${pid}`).toBe(false);
  });
});
