// The whole test environment in one object: a nats-server and a Kubernetes control plane,
// in one run folder. Used by vitest's global setup and by `test/env/up.ts` (by hand).
import { mkdirSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type ClusterInfo, TestCluster } from "./cluster.ts";
import { type NatsInfo, type NatsServer, startNats } from "./nats.ts";
import { binaries } from "./paths.ts";

export interface TestEnvInfo {
  nats: NatsInfo;
  kube: ClusterInfo;
  /** Folder of this run: logs/ stays after the run for post-mortems. */
  runDir: string;
  binaries: ReturnType<typeof binaries>;
}

const RUNS_KEPT = 3;

/** Whether the process of a run folder (`run-<time>-<pid>`) still runs. */
function runAlive(folder: string): boolean {
  const pid = Number(/-(\d+)$/.exec(folder)?.[1]);
  if (!(pid > 0) || pid === process.pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM"; // (alive, another user's)
  }
}

/**
 * Deletes all but the newest few earlier run folders, never one whose run is still going
 * (another checkout's tests on this machine: their etcd and NATS data are in it).
 */
function pruneOldRuns(root: string): void {
  let runs: string[];
  try {
    runs = readdirSync(root).filter((d) => d.startsWith("run-") && !runAlive(d));
  } catch {
    return;
  }
  const byAge = runs
    .flatMap((d) => {
      try {
        return [{ d, t: statSync(join(root, d)).mtimeMs }];
      } catch {
        return []; // (gone meanwhile: another run pruned it)
      }
    })
    .sort((a, b) => b.t - a.t);
  for (const { d } of byAge.slice(RUNS_KEPT))
    rmSync(join(root, d), { recursive: true, force: true });
}

export class TestEnvironment {
  readonly info: TestEnvInfo;
  #nats: NatsServer;
  #cluster: TestCluster;

  private constructor(info: TestEnvInfo, nats: NatsServer, cluster: TestCluster) {
    this.info = info;
    this.#nats = nats;
    this.#cluster = cluster;
  }

  static async start(log: (msg: string) => void = () => {}): Promise<TestEnvironment> {
    const root = join(tmpdir(), "expertmesh-test");
    mkdirSync(root, { recursive: true });
    pruneOldRuns(root);
    const runDir = join(
      root,
      `run-${new Date().toISOString().replace(/[:.]/g, "-")}-${process.pid}`,
    );
    const logDir = join(runDir, "logs");
    mkdirSync(logDir, { recursive: true });
    // The run's port registry (freePort): the test processes, started after this, inherit it.
    mkdirSync(join(runDir, "ports"));
    process.env["EXPERTMESH_TEST_PORTS"] = join(runDir, "ports");
    log(`run folder ${runDir} (logs in logs/)`);
    const bin = binaries();
    const t0 = Date.now();
    const nats = await startNats(bin.natsServer, join(runDir, "nats"), logDir);
    log(`nats-server ready at ${nats.info.url} (JetStream on)`);
    let cluster: TestCluster;
    try {
      cluster = await TestCluster.start(bin, {
        dir: join(runDir, "kube"),
        logDir,
        // Four nodes, 32 GPUs: enough that test files sharing the cluster do not starve
        // each other of nvidia.com/gpu (each file also deletes what it created).
        numNodes: 4,
        gpusPerNode: 8,
        log,
      });
    } catch (err) {
      await nats.process.stop();
      throw err;
    }
    log(`environment up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return new TestEnvironment(
      { nats: nats.info, kube: cluster.info, runDir, binaries: bin },
      nats,
      cluster,
    );
  }

  /** Stops everything, then deletes the run's data (etcd, JetStream) but keeps its logs. */
  async stop(): Promise<void> {
    await this.#cluster.stop();
    await this.#nats.process.stop();
    for (const d of ["kube/etcd", "nats/jetstream"]) {
      rmSync(join(this.info.runDir, d), { recursive: true, force: true });
    }
  }
}
