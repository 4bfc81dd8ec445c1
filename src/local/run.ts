// `expertmesh up`'s processes once prepareRun (src/local/prepare.ts) has decided and written
// everything: a nats-server, the expert shards (replicas.min of each) and the gateways (behind
// up's own front when there are several, or under --watch: src/local/front.ts), supervised by
// src/local/children.ts; it prints the endpoints once everything serves, and stops everything
// on Ctrl-C. With --single-process, one gateway runs the routed experts itself (gateway
// --local): no nats-server, no shards. With autoscaling or rebalancing on, the operator's
// autoscaler runs here (src/local/autoscale.ts). Under `up --watch` (src/local/watch.ts), an
// edit the running processes can take arrives on standard input (the gateways roll onto it,
// replicas start or stop; ADR 0041), and so does news that the -f files changed: new API keys
// or certificates reach the gateways through their files (ADR 0043).
import { writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import {
  batchArgs,
  chatTemplateArgs,
  type GatewayRole,
  gatewayArgs,
  modelArgs,
  prefixCacheDiskArgs,
  servedModelName,
} from "../api/manifest.ts";
import type { DeepSeekModel } from "../api/schema.ts";
import { cacheDir } from "../util/cache-dir.ts";
import { formatError } from "../util/errors.ts";
import { LocalAutoscaler, localPrefills } from "./autoscale.ts";
import { type ChildSpec, type Supervised, Supervisor } from "./children.ts";
import { GatewayFront } from "./front.ts";
import {
  type GatewaySecrets,
  gatewaySecrets,
  gatewaySecretsNotes,
  type SecretsRead,
  secretsEdit,
  writeGatewaySecretFiles,
} from "./gateway-secrets.ts";
import { manifestChange } from "./manifest-change.ts";
import { findNatsServer } from "./nats-binary.ts";
import { objectsOf } from "./objects.ts";
import { NATS_UNDER_WATCH, onParentLines, stopWhenParentGone } from "./parent-watch.ts";
import { localFiles, type PreparedRun } from "./prepare.ts";

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

/**
 * The flags of the nats-server `up` starts on loopback `port`: with JetStream, stored in
 * `storeDir` (a folder that outlives up's runs, as the disk tier's), when the manifest keeps
 * the prefix cache's blocks on it (spec.gateway.kvCache.remoteBytes).
 */
export function localNatsArgs(m: DeepSeekModel, port: number, storeDir: string): string[] {
  return [
    "-a",
    "127.0.0.1",
    "-p",
    String(port),
    ...(m.spec.gateway.kvCache.remoteBytes > 0 ? ["-js", "-sd", storeDir] : []),
  ];
}

/**
 * What `up` says of its own nats-server at `url`: it stands in for spec.nats, whose URL names
 * the cluster's server and whose Secrets (an identity, TLS) are the cluster's too.
 */
export function localNatsNote(m: DeepSeekModel, url: string): string {
  const n = m.spec.nats;
  const secrets = [
    n.credentialsSecret && "credentialsSecret",
    n.userSecret && "userSecret",
    n.tokenSecret && "tokenSecret",
    n.nkeySecret && "nkeySecret",
    n.tls && "tls",
  ].filter((s): s is string => typeof s === "string");
  const why =
    secrets.length === 0
      ? ""
      : `; spec.nats.${secrets.join(", ")} (Kubernetes Secrets) unused: it takes no credentials and speaks plain text on loopback`;
  const copies = m.spec.gateway.kvCache.remoteReplicas ?? 1;
  const one =
    copies > 1 && m.spec.gateway.kvCache.remoteBytes > 0
      ? `; one server: the prefix cache's bucket in one copy, not spec.gateway.kvCache.remoteReplicas's ${copies}`
      : "";
  return `nats-server on ${url} (in place of spec.nats.url, ${n.url}${why}${one})`;
}

/**
 * A gateway's flags from the manifest, for `up`'s one nats-server: the NATS tier's bucket in
 * one copy whatever kvCache.remoteReplicas says (a server holds no second copy).
 */
export function localGatewayArgs(m: DeepSeekModel, role: GatewayRole): string[] {
  return gatewayArgs(m, role).filter((a) => !a.startsWith("--prefix-cache-remote-replicas="));
}

/**
 * The disk tier's flags of `up`'s gateway replica `r` (none without kvCache.diskBytes), in
 * `dir`, a folder that outlives up's runs: `several` gateways share it, as on a ReadWriteMany
 * volume, unless they share a NATS tier (kvCache.remoteBytes): then each has a folder of its
 * own under it (as does each gateway and prefill gateway with spec.gateway.disaggregation).
 */
export function localDiskArgs(
  m: DeepSeekModel,
  dir: string,
  r: number,
  several: boolean,
  role: GatewayRole = "gateway",
): string[] {
  // Prefill gateways (spec.gateway.disaggregation) are more gateways over the NATS tier.
  const own =
    (several || m.spec.gateway.disaggregation !== undefined) &&
    m.spec.gateway.kvCache.remoteBytes > 0;
  const disk = prefixCacheDiskArgs(m, own ? join(dir, `${role}-${r}`) : dir);
  if (several && !own && disk.length > 0 && !disk.includes("--prefix-cache-disk-shared"))
    disk.push("--prefix-cache-disk-shared");
  return disk;
}

/** What `up` runs beyond the prepared run: its -f files (read again under --watch), flags. */
export interface RunFlags {
  /** The -f files' paths. */
  files: string[];
  /** Where the gateways (or up's front) listen: --host, else loopback. */
  host: string;
  /** --micro-batches, passed on to the gateways. */
  microBatches?: string | undefined;
}

/** A gateway's listening flags: its ports (0: any) and address. */
interface Listen {
  http: number;
  grpc: number;
  host: string;
}

/** The ports a gateway's ready line names (the HTTP API's and gRPC's). */
function portsOf(line: string): { http?: string | undefined; grpc?: string | undefined } {
  return {
    http: /on https?:\/\/\S+?:(\d+)/.exec(line)?.[1],
    grpc: /gRPC \(KServe v2\) on :(\d+)/.exec(line)?.[1],
  };
}

/**
 * One `up` run's processes, from the first start to the exit: `run` starts them and never
 * returns (up exits from stop).
 */
export class LocalRun {
  readonly #p: PreparedRun;
  readonly #flags: RunFlags;
  readonly #say: (msg: string) => void;
  readonly #children: Supervisor;
  #scaler: LocalAutoscaler | undefined;
  /** up's own listener in front of the gateways (several of them, or under --watch). */
  #front: GatewayFront | undefined;
  #natsUrl = "";
  /** The gateways' ports, as the banner says them (known once the first one serves). */
  #ports: { http: string; grpc: string } | undefined;
  /** The flags every shard and gateway gets (the model, its name, the manifest's). */
  readonly #named: string[];
  /** Where the gateways find the routed experts: the shards' flags, or --local. */
  #experts: string[] = [];
  /** Outlives the run folder: the next `up` of this model starts with the blocks. */
  readonly #diskDir: string;
  /** spec.gateway.batch's folder (ADR 0049). */
  readonly #batchDir: string;
  // Replica numbers count up per role: a replica started by the autoscaler never takes the
  // name, or the restart history, of one it stopped.
  readonly #shardsStarted = new Map<number, number>();
  #gatewaysStarted = 0;
  #prefillsStarted = 0;

  // The manifest the gateways start from: the prepared one, until up --watch rolls them onto
  // an edit that reaches them alone (src/local/manifest-change.ts); each edit's chat template
  // is a file of its own (a gateway of the previous one may start again while the roll
  // runs), and an edit that names other Secrets writes their files as a new version (the
  // gateways still running on the previous ones keep theirs).
  #gm: DeepSeekModel;
  #secretsRead: SecretsRead;
  #secretArgs: string[];
  #chatTemplatePath: string;
  #secretsVersion = 0;
  #templatesWritten = 0;
  /** The manifest the running processes follow (up --watch's edits applied). */
  #applied: DeepSeekModel;
  // Edits from up --watch: applied once everything serves, one at a time, each against the
  // one before.
  #editsOpen = false;
  readonly #earlyEdits: DeepSeekModel[] = [];
  #editing = Promise.resolve();

  constructor(prepared: PreparedRun, flags: RunFlags) {
    this.#p = prepared;
    this.#flags = flags;
    this.#say = prepared.say;
    this.#children = new Supervisor(prepared.board, prepared.say, () => void this.stop(1));
    const { m, modelDir, ns, name } = prepared;
    this.#gm = m;
    this.#applied = m;
    this.#secretsRead = prepared.secretsRead;
    this.#secretArgs = prepared.secretArgs;
    this.#chatTemplatePath = prepared.chatTemplatePath;
    this.#named = [
      `--model=${modelDir}`,
      `--namespace=${ns}`,
      `--model-name=${name}`,
      // Text lines on up's terminal (it reads its children's lines): spec.logFormat is the pods'.
      ...modelArgs(m).filter((a) => !a.startsWith("--log-format")),
    ];
    this.#diskDir = join(cacheDir(), "prefix-cache", `${ns}-${name}`);
    this.#batchDir = join(cacheDir(), "batch", `${ns}-${name}`);
  }

  /** Starts everything, says where it serves, and runs until stopped (up exits then). */
  async run(): Promise<never> {
    process.on("SIGINT", () => void this.stop(0));
    process.on("SIGTERM", () => void this.stop(0));
    // The terminal closed: the children, in groups of their own, would not hear of it.
    process.on("SIGHUP", () => void this.stop(0));
    // Under `up --watch`: stop when it is gone, however it went (src/local/watch.ts).
    stopWhenParentGone(() => void this.stop(0));
    onParentLines((line) => this.#fromParent(line));
    process.on("exit", () => this.#children.killAll());
    if (this.#gm.spec.gateway.batch)
      this.#say(
        `spec.gateway.batch: /v1/files and /v1/batches keep their files and batches in ${this.#batchDir} (every gateway, and the next up, go on with them)`,
      );
    try {
      await this.#startAll();
      this.#children.serving = true;
      this.#editsOpen = true;
      for (const next of this.#earlyEdits.splice(0)) this.#queueEdit(next);
      this.#startAutoscaler();
    } catch (err) {
      // (Ctrl-C while starting makes children exit "before they were ready": not news.)
      if (!this.#children.stopping) {
        this.#p.board.close("stopped");
        this.#say(formatError(err));
        await this.stop(1);
      }
    }
    return await new Promise<never>(() => {});
  }

  /** Stops everything in order and exits with `code`; a second call exits at once. */
  async stop(code: number): Promise<never> {
    if (this.#children.stopping) {
      // A second Ctrl-C: no more waiting.
      this.#say("stopping now");
      process.exit(code);
    }
    this.#children.stopping = true;
    void this.#scaler?.stop();
    // (the front closed, the gateways' second of draining would serve no one: stopInOrder
    // ends it)
    this.#front?.close();
    this.#p.board.close("stopped");
    this.#say("stopping (Ctrl-C again to stop at once)");
    await this.#children.stopInOrder();
    process.exit(code);
  }

  /** nats-server and the shards (unless single), then the gateways; the banner. */
  async #startAll(): Promise<void> {
    const p = this.#p;
    this.#experts = p.single ? ["--local"] : await this.#startShards();
    // More than one gateway: `up` listens on the ports (the gateways' Service) and each
    // gateway on loopback ports of its own (src/local/front.ts).
    if (p.gateways.front) {
      this.#front = new GatewayFront();
      const at = await this.#front.listen(this.#flags.host, p.httpPort, p.grpcPort);
      this.#ports = { http: String(at.http), grpc: String(at.grpc) };
    }
    const prefills = Array.from({ length: localPrefills(p.m) }, () =>
      this.#children.start(this.#prefillSpec(), false),
    );
    const first = this.#gatewaySpec();
    const servingLines = await Promise.all([
      this.#children.start(first, false),
      ...Array.from({ length: p.gateways.initial - 1 }, () =>
        this.#children.start(this.#gatewaySpec(), false),
      ),
    ]);
    await Promise.all(prefills);
    p.board.close();
    if (!this.#ports) {
      // The ports the gateway listens on (not the flags: those may be 0); a gateway started
      // again takes the same ones.
      const at = portsOf(servingLines[0]!);
      const http = at.http ?? String(p.httpPort);
      const grpc = at.grpc ?? String(p.grpcPort);
      this.#ports = { http, grpc };
      first.args = first.args.map((a) =>
        a.startsWith("--http-port=")
          ? `--http-port=${http}`
          : a.startsWith("--grpc-port=")
            ? `--grpc-port=${grpc}`
            : a,
      );
    } else {
      this.#say(
        `${p.gateways.initial} gateway(s) behind ${this.#flags.host}:${this.#ports.http} and :${this.#ports.grpc}, each connection to the one with the fewest`,
      );
    }
    process.stdout.write(this.#banner(this.#ports));
  }

  /** nats-server and the shards; resolves with the gateway's flags to reach them. */
  async #startShards(): Promise<string[]> {
    const { m, ns, name, plan, planPath } = this.#p;
    const natsPort = await freePort();
    await this.#children.start(
      {
        name: "nats",
        cmd: "sh",
        args: [
          "-c",
          NATS_UNDER_WATCH,
          "nats-server",
          findNatsServer(),
          ...localNatsArgs(m, natsPort, join(cacheDir(), "jetstream", `${ns}-${name}`)),
        ],
        readyLine: /Server is ready/,
        bar: false,
      },
      false,
    );
    this.#natsUrl = `nats://127.0.0.1:${natsPort}`;
    this.#say(localNatsNote(m, this.#natsUrl));
    const shards = [];
    for (let k = 0; k < plan.numShards; k++)
      for (let r = 0; r < m.spec.experts.replicas.min; r++)
        shards.push(this.#children.start(this.#shardSpec(k), false));
    await Promise.all(shards);
    return [`--plan=${planPath}`, `--nats=${this.#natsUrl}`];
  }

  /** The next replica of shard k. */
  #shardSpec(k: number): ChildSpec {
    const r = this.#shardsStarted.get(k) ?? 0;
    this.#shardsStarted.set(k, r + 1);
    return {
      name: `shard-${k}.${r}`,
      cmd: process.execPath,
      args: [
        process.argv[1]!,
        "shard",
        ...this.#named,
        `--plan=${this.#p.planPath}`,
        `--nats=${this.#natsUrl}`,
        `--shard=${k}`,
        `--id=r${r}`,
        "--metrics-port=0",
        `--device=${this.#p.devices.shard(k)}`,
      ],
      readyLine: /serving /,
      bar: true,
    };
  }

  /** A gateway process's flags: a serving gateway's or a prefill gateway's, replica r. */
  #gatewayFlags(role: GatewayRole, r: number, listen: Listen): string[] {
    const gm = this.#gm;
    const front = this.#front !== undefined;
    const microBatches = this.#flags.microBatches;
    return [
      process.argv[1]!,
      "gateway",
      ...this.#named,
      ...this.#experts,
      `--http-port=${listen.http}`,
      `--grpc-port=${listen.grpc}`,
      `--host=${listen.host}`,
      "--metrics-port=0",
      `--device=${this.#p.devices.gateway}`,
      ...localGatewayArgs(gm, role),
      ...localDiskArgs(gm, this.#diskDir, r, role === "prefill" || front, role),
      // Every gateway on one folder that outlives up's runs, as on a shared claim.
      ...(role === "gateway" ? batchArgs(gm, this.#batchDir) : []),
      ...chatTemplateArgs(gm, this.#chatTemplatePath),
      ...this.#secretArgs,
      ...(microBatches ? [`--micro-batches=${microBatches}`] : []),
      // Behind the front: a stopping gateway (scaled down, rolled) answers for a second
      // more, each answer ending its connection, so keep-alive clients move to the others
      // before it closes the idle ones (a request sent as one closes would fail).
      ...(front && role === "gateway" ? ["--shutdown-delay=1"] : []),
    ];
  }

  /** The next serving gateway: behind the front, or on the ports itself. */
  #gatewaySpec(): ChildSpec {
    const r = this.#gatewaysStarted++;
    const front = this.#front;
    const name = front ? `gateway.${r}` : "gateway";
    const { httpPort, grpcPort } = this.#p;
    const ports = this.#ports;
    const listen: Listen = front
      ? { http: 0, grpc: 0, host: "127.0.0.1" }
      : ports // (known once the first one serves: one started in a roll takes them)
        ? { http: +ports.http, grpc: +ports.grpc, host: this.#flags.host }
        : { http: httpPort, grpc: grpcPort, host: this.#flags.host };
    return {
      name,
      cmd: process.execPath,
      args: this.#gatewayFlags("gateway", r, listen),
      readyLine: /serving '/,
      bar: true,
      ...(front
        ? {
            onReady: (line: string) => {
              const at = portsOf(line);
              if (at.http && at.grpc) front.add(name, { http: +at.http, grpc: +at.grpc });
            },
            onStop: () => front.remove(name),
          }
        : {}),
    };
  }

  /**
   * The next prefill gateway (spec.gateway.disaggregation, ADR 0029): on loopback, out of the
   * front's rotation; the gateways hand them long prompts over NATS.
   */
  #prefillSpec(): ChildSpec {
    const r = this.#prefillsStarted++;
    return {
      name: `prefill.${r}`,
      cmd: process.execPath,
      args: this.#gatewayFlags("prefill", r, { http: 0, grpc: 0, host: "127.0.0.1" }),
      readyLine: /serving '/,
      bar: true,
    };
  }

  /** The next process of a role: "gateway" (with the front), "prefill" or "shard-<k>". */
  #specFor(role: string): ChildSpec {
    if (role === "gateway") return this.#gatewaySpec();
    if (role === "prefill") return this.#prefillSpec();
    return this.#shardSpec(Number(role.slice("shard-".length)));
  }

  /** Starts or stops processes of `role` until `n` run (the autoscaler's, an edit's). */
  #scale(role: string, n: number): void {
    this.#children.scale(role, n, () => this.#specFor(role));
  }

  /** Where it serves and how to ask it: curl and bench lines (with TLS and keys if any). */
  #banner(ports: { http: string; grpc: string }): string {
    const { m, tls, shellKeys } = this.#p;
    const { http, grpc } = ports;
    const host = this.#flags.host;
    const at = host === "0.0.0.0" || host === "::" ? "127.0.0.1" : host;
    const model = servedModelName(m);
    const scheme = tls ? "https" : "http";
    // (with TLS, curl and bench trust the certificate's CA: --cacert; with API keys, they
    // send one, never printed here)
    const trust = tls ? " --cacert CA.crt" : "";
    const keys = this.#secretsRead.gateway.apiKeys;
    const keyed = keys !== undefined || shellKeys;
    return (
      `\nexpertmesh is serving '${model}' at ${scheme}://${at}:${http}/v1 (OpenAI-compatible)\n` +
      `  and over gRPC${tls ? " with TLS" : ""} at ${at}:${grpc} (KServe v2 inference.GRPCInferenceService, expertmesh.v1.Generation)\n` +
      (keyed
        ? `  API keys required (${keys ? `spec.gateway.apiKeySecret's, from ${keys.source}` : "$EM_API_KEYS"}): KEY below is one of them\n`
        : "") +
      `  curl${trust} ${scheme}://${at}:${http}/v1/chat/completions -H 'content-type: application/json' \\\n` +
      (keyed ? "    -H 'authorization: Bearer KEY' \\\n" : "") +
      `    -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}'\n` +
      `  expertmesh bench --url ${scheme}://${at}:${http}${trust}${keyed ? " --api-key KEY" : ""} measures it under load\n` +
      "Ctrl-C stops everything.\n\n"
    );
  }

  /** The autoscaler (or rebalancer) the manifest asks for, over up's processes. */
  #startAutoscaler(): void {
    const { m, plan, planPath, scaling } = this.#p;
    for (const note of scaling.notes) this.#say(note);
    if (!scaling.run) return;
    const children = this.#children;
    this.#scaler = new LocalAutoscaler({
      model: m,
      plan,
      planPath,
      natsUrl: this.#natsUrl,
      say: this.#say,
      processes: {
        roles: [
          ...(this.#front ? ["gateway"] : []),
          ...(m.spec.gateway.disaggregation ? ["prefill"] : []),
          ...Array.from({ length: plan.numShards }, (_, k) => `shard-${k}`),
        ],
        replicas: (role) => children.replicasOf(role).length,
        ready: (role) => children.replicasOf(role).filter((e) => e.ready).length,
        scale: (role, n) => this.#scale(role, n),
      },
    });
    this.#scaler.start();
  }

  /**
   * A line from up --watch (src/local/watch.ts): `{"manifest": ...}`, an edit the running
   * processes take (src/local/manifest-change.ts), or `{"files": true}`, the -f files changed.
   */
  #fromParent(line: string): void {
    let next: DeepSeekModel;
    try {
      const message = JSON.parse(line) as {
        manifest?: DeepSeekModel;
        files?: boolean;
        quiet?: boolean;
      };
      if (message.files === true) {
        this.#reloadFiles(message.quiet === true);
        return;
      }
      next = message.manifest!;
      if (typeof next?.spec?.gateway !== "object") throw new Error("it has no spec.gateway");
    } catch (err) {
      this.#say(
        `a line from up --watch that is no manifest (${formatError(err)}): nothing changes`,
      );
      return;
    }
    this.#queueEdit(next);
  }

  /** The Secrets and ConfigMaps of the -f files as they are now. */
  #objectsNow() {
    return objectsOf(localFiles(this.#flags.files).texts, this.#p.ns);
  }

  /**
   * The -f files changed: their Secrets' new content reaches the gateways' files, which they
   * read again (src/local/gateway-secrets.ts).
   */
  #reloadFiles(quiet: boolean): void {
    let read: SecretsRead;
    try {
      const objs = this.#objectsNow();
      read = { gateway: gatewaySecrets(this.#gm, objs) };
    } catch (err) {
      this.#say(`the -f files changed, but ${formatError(err)}: the gateways keep what they have`);
      return;
    }
    const edit = secretsEdit(this.#gm, this.#secretsRead, read);
    this.#secretsRead = edit.running;
    if (edit.write)
      writeGatewaySecretFiles(this.#p.runDir, this.#secretsRead.gateway, this.#secretsVersion);
    for (const note of edit.notes) this.#say(note);
    if (edit.notes.length === 0 && !quiet)
      this.#say("the -f files changed, but not what the processes read of them");
  }

  #queueEdit(next: DeepSeekModel): void {
    if (!this.#editsOpen) {
      this.#earlyEdits.push(next);
      return;
    }
    this.#editing = this.#editing.then(
      () => this.#applyEdit(next),
      () => {},
    );
  }

  /** An edit from up --watch: the gateways roll onto it, replica counts change. */
  async #applyEdit(next: DeepSeekModel): Promise<void> {
    const change = manifestChange(this.#applied, next, this.#p.single);
    if (change.kind === "all")
      this.#say(`an edit from up --watch reaches more than it can apply (${change.why}): ignored`);
    if (change.kind !== "live") return;
    const { runDir, shellKeys, plan } = this.#p;
    // Other Secrets for the API keys or the certificate (spec.gateway.apiKeySecret, .tls):
    // the new gateways read them from files of a version of their own.
    const before: Before = {
      applied: this.#applied,
      gm: this.#gm,
      secretsRead: this.#secretsRead,
      secretArgs: this.#secretArgs,
    };
    const refs = (x: DeepSeekModel) =>
      JSON.stringify([x.spec.gateway.apiKeySecret, x.spec.gateway.tls]);
    if (change.roll && refs(next) !== refs(this.#gm)) {
      let gateway: GatewaySecrets;
      try {
        gateway = gatewaySecrets(next, this.#objectsNow());
      } catch (err) {
        this.#say(`the edit names Secrets the gateways cannot use (${formatError(err)}): ignored`);
        return;
      }
      if (this.#secretsRead.gateway.apiKeys && !next.spec.gateway.apiKeySecret && !shellKeys)
        this.#say(
          "spec.gateway.apiKeySecret is gone: the new gateways take requests without a key",
        );
      if (this.#secretsRead.gateway.tls && !next.spec.gateway.tls)
        this.#say("spec.gateway.tls is gone: the new gateways serve plain HTTP and gRPC");
      this.#secretsRead = { ...this.#secretsRead, gateway };
      this.#secretArgs = writeGatewaySecretFiles(runDir, gateway, ++this.#secretsVersion);
      for (const note of gatewaySecretsNotes(next, gateway, shellKeys)) this.#say(note);
    }
    this.#applied = next;
    const olds = change.roll
      ? this.#children.children.filter(
          (e) =>
            !e.retired && (e.spec.name.startsWith("gateway") || e.spec.name.startsWith("prefill.")),
        )
      : [];
    if (change.roll) {
      this.#gm = next; // (gateways that scaling starts take the new flags too)
      if (next.spec.gateway.chatTemplate !== undefined) {
        this.#chatTemplatePath = join(runDir, `chat_template.${++this.#templatesWritten}.jinja`);
        writeFileSync(this.#chatTemplatePath, next.spec.gateway.chatTemplate);
      }
    }
    if (change.gateways !== undefined) this.#scale("gateway", change.gateways);
    if (change.shardReplicas !== undefined)
      for (let k = 0; k < plan.numShards; k++) this.#scale(`shard-${k}`, change.shardReplicas);
    if (olds.length > 0) await this.#rollGateways(olds, before);
  }

  /**
   * Replaces `olds` with gateways on the edited manifest's flags, one at a time, each new one
   * serving before the one it replaces leaves the front's rotation (ADR 0041; under --watch
   * the front holds the ports however many gateways run, and prefill gateways have none). A
   * new one that does not start stops the roll: the rest serve on, on `before`'s flags.
   */
  async #rollGateways(olds: Supervised[], before: Before): Promise<void> {
    const children = this.#children;
    olds = olds.filter((e) => !e.retired); // (an edit's scaling down stops the newest)
    this.#say(
      `rolling ${olds.length} gateway process(es) onto the edited manifest, one at a time: each new one serves before the one it replaces stops (nats-server and the shards run on)`,
    );
    for (const old of olds) {
      if (children.stopping) return;
      const isPrefill = old.spec.name.startsWith("prefill.");
      // Out of the autoscaler's count while its replacement starts (it serves until then).
      old.retired = true;
      const spec = isPrefill ? this.#prefillSpec() : this.#gatewaySpec();
      spec.rollout = true;
      old.retiredAs =
        spec.name === old.spec.name
          ? "to start on the edited manifest"
          : `replaced by ${spec.name}`;
      try {
        await children.start(spec, true);
      } catch (err) {
        if (children.stopping) return;
        this.#say(
          `${spec.name} did not start on the edited manifest (${formatError(err)}): the roll stops here; ${old.spec.name} serves on (fix the manifest to roll again)`,
        );
        old.retired = false;
        old.retiredAs = undefined;
        this.#gm = before.gm;
        this.#secretsRead = before.secretsRead;
        this.#secretArgs = before.secretArgs;
        return;
      }
      // Out of the rotation, then it finishes what it has.
      Supervisor.stop(old);
      this.#say(`${spec.name} serves the edited manifest`);
    }
    const name = servedModelName(this.#gm);
    this.#say(
      name === servedModelName(before.applied)
        ? "the gateways run the edited manifest"
        : `the gateways run the edited manifest, serving '${name}'`,
    );
  }
}

/** What the gateways ran on before an edit: a roll that stops goes back to it. */
interface Before {
  /** The manifest the processes followed. */
  applied: DeepSeekModel;
  /** The gateways' flags' manifest. */
  gm: DeepSeekModel;
  secretsRead: SecretsRead;
  secretArgs: string[];
}
