// `expertmesh up -f MANIFEST`: runs a DeepSeekModel manifest on this machine as child
// processes — a nats-server, the expert shards (replicas.min of each) and one gateway —
// prints the endpoint, and stops everything on Ctrl-C.
import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { readManifest, servedModelName } from "../../api/manifest.ts";
import { findNatsServer } from "../../local/nats-binary.ts";
import { modelArchitectureOf, readModelConfig } from "../../model/config.ts";
import { writeTinyModel } from "../../model/tiny.ts";
import { planPlacement } from "../../moe/placement.ts";
import { serializePlan } from "../../moe/plan-json.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh up -f MANIFEST.yaml [options]
  --model DIR        checkpoint folder (default: <models-dir>/<spec.model.source.pvc.path>)
  --models-dir DIR   where local mode finds PVC paths (default ~/.cache/expertmesh/models)
  --http-port PORT   the gateway's OpenAI API (default: spec.gateway.ports.http, 8000)
  --host ADDR        listen address (default 127.0.0.1)
  --micro-batches N  the gateway's micro-batches in flight per step, 1 or 2 (gateway --micro-batches)
A tiny-v2/tiny-v3 preset whose folder does not exist yet is created (deterministic, seed 0).`;

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a ? resolve(a.port) : reject(new Error("no port"))));
    });
  });
}

/** Spawns a child whose output is prefixed with its name; resolves when `ready` appears. */
function child(
  name: string,
  cmd: string,
  args: string[],
  ready: RegExp,
): { proc: ChildProcess; ready: Promise<void> } {
  const proc = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  let resolveReady!: () => void;
  let rejectReady!: (e: Error) => void;
  const readyP = new Promise<void>((res, rej) => {
    resolveReady = res;
    rejectReady = rej;
  });
  const onData = (d: Buffer) => {
    for (const line of d.toString().split("\n")) {
      if (!line.trim()) continue;
      process.stderr.write(`[${name}] ${line.replace(/^\S+Z (shard \S+: |gateway: )?/, "")}\n`);
      if (ready.test(line)) resolveReady();
    }
  };
  proc.stdout!.on("data", onData);
  proc.stderr!.on("data", onData);
  proc.on("exit", (code, sig) =>
    rejectReady(
      new ExpertMeshError(
        "EM_LOCAL_CHILD_EXITED",
        `${name} exited (${sig ?? code}) before it was ready`,
      ),
    ),
  );
  return { proc, ready: readyP };
}

export const upCommand: Command = {
  name: "up",
  summary:
    "run a DeepSeekModel manifest on this machine: nats-server, shards and a gateway as local processes",
  usage: USAGE,
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: {
        file: { type: "string", short: "f" },
        model: { type: "string" },
        "models-dir": { type: "string" },
        "http-port": { type: "string" },
        host: { type: "string" },
        "micro-batches": { type: "string" },
      },
    });
    if (!values.file) throw new ExpertMeshError("EM_CLI_USAGE", "-f MANIFEST.yaml is required");
    const m = readManifest(values.file);
    const name = m.metadata.name;
    const ns = m.metadata.namespace ?? "default";
    const cache =
      process.env["EXPERTMESH_CACHE_DIR"] ??
      join(process.env["XDG_CACHE_HOME"] ?? join(homedir(), ".cache"), "expertmesh");
    const pvcPath = m.spec.model.source.pvc?.path;
    if (!values.model && pvcPath === undefined) {
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        "local mode reads weights from a folder: the manifest's source is not a PVC, so pass --model DIR",
      );
    }
    const modelDir =
      values.model ?? join(values["models-dir"] ?? join(cache, "models"), pvcPath || name);
    if (!existsSync(join(modelDir, "config.json"))) {
      const preset = m.spec.model.preset;
      if (preset !== "tiny-v2" && preset !== "tiny-v3") {
        throw new ExpertMeshError(
          "EM_CKPT_READ",
          `no checkpoint at ${modelDir} (config.json missing): copy the model there or pass --model DIR`,
        );
      }
      process.stderr.write(`[up] creating the ${preset} model in ${modelDir}\n`);
      mkdirSync(modelDir, { recursive: true });
      await writeTinyModel(modelDir, {
        arch: preset === "tiny-v2" ? "v2" : "v3",
        preset: "tiny",
        seed: 0,
      });
    }

    const config = readModelConfig(modelDir);
    const plan = planPlacement({
      architecture: modelArchitectureOf(config),
      numShards: m.spec.experts.shards,
      redundantExperts: m.spec.experts.redundantExperts,
    });
    const runDir = mkdtempSync(join(tmpdir(), `expertmesh-up-${name}-`));
    const planPath = join(runDir, "plan.json");
    writeFileSync(planPath, serializePlan(plan));
    process.stderr.write(
      `[up] ${ns}/${name}: ${plan.numShards} shard(s) x ${m.spec.experts.replicas.min} replica(s), plan v${plan.version}, run folder ${runDir}\n`,
    );

    const children: ChildProcess[] = [];
    let stopping = false;
    const stopAll = async (code: number) => {
      if (stopping) return;
      stopping = true;
      process.stderr.write("[up] stopping\n");
      // Gateway first (finishes requests in flight), then shards (drain), then NATS.
      for (const c of [...children].reverse()) {
        if (c.exitCode !== null || c.signalCode !== null) continue;
        c.kill("SIGTERM");
        await new Promise<void>((r) => {
          const t = setTimeout(() => {
            c.kill("SIGKILL");
            r();
          }, 10_000);
          c.once("exit", () => {
            clearTimeout(t);
            r();
          });
        });
      }
      process.exit(code);
    };
    process.on("SIGINT", () => void stopAll(0));
    process.on("SIGTERM", () => void stopAll(0));
    process.on("exit", () => {
      for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
    });

    try {
      const natsPort = await freePort();
      const nats = child(
        "nats",
        findNatsServer(),
        ["-a", "127.0.0.1", "-p", String(natsPort)],
        /Server is ready/,
      );
      children.push(nats.proc);
      await nats.ready;
      const natsUrl = `nats://127.0.0.1:${natsPort}`;
      const cli = [process.argv[1]!];
      const common = [
        `--model=${modelDir}`,
        `--plan=${planPath}`,
        `--nats=${natsUrl}`,
        `--namespace=${ns}`,
        `--model-name=${name}`,
      ];
      const shards = [];
      for (let k = 0; k < plan.numShards; k++) {
        for (let r = 0; r < m.spec.experts.replicas.min; r++) {
          const s = child(
            `shard-${k}.${r}`,
            process.execPath,
            [...cli, "shard", ...common, `--shard=${k}`, `--id=r${r}`, "--metrics-port=0"],
            /serving /,
          );
          children.push(s.proc);
          shards.push(s.ready);
        }
      }
      await Promise.all(shards);
      const port = values["http-port"] ?? String(m.spec.gateway.ports.http);
      const host = values.host ?? "127.0.0.1";
      const gw = child(
        "gateway",
        process.execPath,
        [
          ...cli,
          "gateway",
          ...common,
          `--served-model-name=${servedModelName(m)}`,
          `--http-port=${port}`,
          `--host=${host}`,
          "--metrics-port=0",
          `--max-queue-depth=${m.spec.gateway.limits.maxQueueDepth}`,
          ...(values["micro-batches"] ? [`--micro-batches=${values["micro-batches"]}`] : []),
        ],
        /serving '/,
      );
      children.push(gw.proc);
      await gw.ready;
      process.stdout.write(
        `\nexpertmesh is serving '${servedModelName(m)}' at http://${host}:${port}/v1 (OpenAI-compatible)\n` +
          `  curl http://${host}:${port}/v1/chat/completions -H 'content-type: application/json' \\\n` +
          `    -d '{"model": "${servedModelName(m)}", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'\n` +
          "Ctrl-C stops everything.\n\n",
      );
      for (const c of children) {
        c.on("exit", (code, sig) => {
          if (!stopping) {
            process.stderr.write(`[up] a child exited unexpectedly (${sig ?? code}); stopping\n`);
            void stopAll(1);
          }
        });
      }
    } catch (err) {
      process.stderr.write(`[up] ${err instanceof Error ? err.message : String(err)}\n`);
      await stopAll(1);
    }
    await new Promise(() => {});
    return 0;
  },
};
