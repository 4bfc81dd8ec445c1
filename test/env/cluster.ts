// A real Kubernetes control plane for tests, envtest-style but complete: etcd,
// kube-apiserver (TLS, token auth, RBAC), kube-controller-manager, kube-scheduler, and kwok
// managing fake GPU nodes so that scheduled pods turn Running without a kubelet.
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import { CoreV1Api, KubeConfig, type V1Node } from "@kubernetes/client-node";
import { makePki, type Pki, writeKubeconfig } from "./pki.ts";
import { freePort, ManagedProcess } from "./process.ts";

export interface ClusterInfo {
  /** https://127.0.0.1:PORT */
  server: string;
  /** kubeconfig of the admin identity (system:masters). */
  kubeconfig: string;
  /** kubeconfig of an authenticated identity with no RBAC grants. */
  nobodyKubeconfig: string;
  caCert: string;
  adminToken: string;
  etcdUrl: string;
  nodeNames: string[];
  pids: Record<string, number>;
}

export interface ClusterBinaries {
  etcd: string;
  kubeApiserver: string;
  kubeControllerManager: string;
  kubeScheduler: string;
  kwok: string;
  kwokStages: string;
}

export interface ClusterOptions {
  dir: string;
  logDir: string;
  /** Fake GPU nodes (default 2), each advertising `gpusPerNode` nvidia.com/gpu (default 8). */
  numNodes?: number;
  gpusPerNode?: number;
  log?: (msg: string) => void;
}

/** Label every fake node carries, and the annotation kwok selects its nodes by. */
export const FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node";

/** GET `url` over TLS with the test CA and a bearer token; resolves the status and body. */
function httpsGet(
  url: string,
  ca: Buffer | undefined,
  token?: string,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpsRequest(
      url,
      {
        ...(ca ? { ca } : { rejectUnauthorized: false }),
        headers: token ? { authorization: `Bearer ${token}` } : {},
        timeout: 5000,
      },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => (body += c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
      },
    );
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end();
  });
}

/** A fake GPU node the way a GPU operator would label it (NVIDIA GPU feature discovery). */
export function fakeGpuNode(name: string, gpus: number): V1Node {
  const capacity = {
    cpu: "64",
    memory: "512Gi",
    pods: "110",
    "nvidia.com/gpu": String(gpus),
    "ephemeral-storage": "1Ti",
  };
  return {
    apiVersion: "v1",
    kind: "Node",
    metadata: {
      name,
      annotations: { [FAKE_NODE_ANNOTATION]: "fake", "node.alpha.kubernetes.io/ttl": "0" },
      labels: {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        type: "kwok",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-H200",
        "nvidia.com/gpu.count": String(gpus),
        "nvidia.com/gpu.memory": "143771",
      },
    },
    spec: {},
    status: {
      capacity,
      allocatable: capacity,
      nodeInfo: {
        kubeletVersion: "fake",
        architecture: "amd64",
        operatingSystem: "linux",
      } as never,
    },
  };
}

export class TestCluster {
  readonly info: ClusterInfo;
  readonly #processes: ManagedProcess[];

  private constructor(info: ClusterInfo, processes: ManagedProcess[]) {
    this.info = info;
    this.#processes = processes;
  }

  /** Starts every component in order and waits until the nodes are Ready. */
  static async start(bin: ClusterBinaries, opts: ClusterOptions): Promise<TestCluster> {
    const log = opts.log ?? (() => {});
    const numNodes = opts.numNodes ?? 2;
    const gpus = opts.gpusPerNode ?? 8;
    const started: ManagedProcess[] = [];
    try {
      const pkiDir = join(opts.dir, "pki");
      mkdirSync(pkiDir, { recursive: true });
      const pki = makePki(pkiDir);
      const ca = readFileSync(pki.caCert);

      // etcd
      const etcdPort = await freePort();
      const peerPort = await freePort();
      const etcdUrl = `http://127.0.0.1:${etcdPort}`;
      const etcd = new ManagedProcess(
        "etcd",
        bin.etcd,
        [
          "--name=default",
          `--data-dir=${join(opts.dir, "etcd")}`,
          `--listen-client-urls=${etcdUrl}`,
          `--advertise-client-urls=${etcdUrl}`,
          `--listen-peer-urls=http://127.0.0.1:${peerPort}`,
          `--initial-advertise-peer-urls=http://127.0.0.1:${peerPort}`,
          `--initial-cluster=default=http://127.0.0.1:${peerPort}`,
          "--unsafe-no-fsync",
          "--log-level=warn",
        ],
        opts.logDir,
      );
      started.push(etcd);
      await etcd.waitUntil("healthy", async () => (await fetch(`${etcdUrl}/health`)).ok);
      log(`etcd ready at ${etcdUrl}`);

      // kube-apiserver
      const apiPort = await freePort();
      const server = `https://127.0.0.1:${apiPort}`;
      const apiserver = new ManagedProcess(
        "kube-apiserver",
        bin.kubeApiserver,
        [
          `--etcd-servers=${etcdUrl}`,
          "--bind-address=127.0.0.1",
          "--advertise-address=127.0.0.1",
          `--secure-port=${apiPort}`,
          `--tls-cert-file=${pki.servingCert}`,
          `--tls-private-key-file=${pki.servingKey}`,
          `--client-ca-file=${pki.caCert}`,
          `--token-auth-file=${pki.tokenFile}`,
          "--authorization-mode=RBAC",
          "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
          `--service-account-key-file=${pki.saPub}`,
          `--service-account-signing-key-file=${pki.saKey}`,
          "--service-cluster-ip-range=10.0.0.0/24",
          "--allow-privileged=true",
          "--profiling=false",
          "--endpoint-reconciler-type=none",
          `--cert-dir=${join(opts.dir, "apiserver-certs")}`,
        ],
        opts.logDir,
      );
      started.push(apiserver);
      await apiserver.waitUntil(
        "ready",
        async () => (await httpsGet(`${server}/readyz`, ca, pki.tokens.admin)).status === 200,
        120_000,
      );
      log(`kube-apiserver ready at ${server}`);

      const kubeconfig = join(opts.dir, "admin.kubeconfig");
      writeKubeconfig(kubeconfig, server, pki.caCert, "admin", pki.tokens.admin);
      const nobodyKubeconfig = join(opts.dir, "nobody.kubeconfig");
      writeKubeconfig(nobodyKubeconfig, server, pki.caCert, "nobody", pki.tokens.nobody);
      const kcmKubeconfig = join(opts.dir, "kcm.kubeconfig");
      writeKubeconfig(
        kcmKubeconfig,
        server,
        pki.caCert,
        "system:kube-controller-manager",
        pki.tokens.controllerManager,
      );
      const schedKubeconfig = join(opts.dir, "scheduler.kubeconfig");
      writeKubeconfig(
        schedKubeconfig,
        server,
        pki.caCert,
        "system:kube-scheduler",
        pki.tokens.scheduler,
      );

      // kube-controller-manager and kube-scheduler, each under its own identity.
      const kcmPort = await freePort();
      const kcm = new ManagedProcess(
        "kube-controller-manager",
        bin.kubeControllerManager,
        [
          `--kubeconfig=${kcmKubeconfig}`,
          `--authentication-kubeconfig=${kcmKubeconfig}`,
          `--authorization-kubeconfig=${kcmKubeconfig}`,
          "--leader-elect=false",
          "--bind-address=127.0.0.1",
          `--secure-port=${kcmPort}`,
          `--cert-dir=${join(opts.dir, "kcm-certs")}`,
          `--service-account-private-key-file=${pki.saKey}`,
          `--root-ca-file=${pki.caCert}`,
          "--use-service-account-credentials=true",
          "--profiling=false",
        ],
        opts.logDir,
      );
      started.push(kcm);
      const schedPort = await freePort();
      const scheduler = new ManagedProcess(
        "kube-scheduler",
        bin.kubeScheduler,
        [
          `--kubeconfig=${schedKubeconfig}`,
          `--authentication-kubeconfig=${schedKubeconfig}`,
          `--authorization-kubeconfig=${schedKubeconfig}`,
          "--leader-elect=false",
          "--bind-address=127.0.0.1",
          `--secure-port=${schedPort}`,
          `--cert-dir=${join(opts.dir, "scheduler-certs")}`,
          "--profiling=false",
        ],
        opts.logDir,
      );
      started.push(scheduler);

      // kwok: manages only the nodes annotated as fake, with kwok's standard stages.
      const stagesPath = join(opts.dir, "kwok-stages.yaml");
      writeFileSync(stagesPath, kwokStages(bin.kwokStages));
      const kwokPort = await freePort();
      const kwok = new ManagedProcess(
        "kwok",
        bin.kwok,
        [
          `--kubeconfig=${kubeconfig}`,
          `--config=${stagesPath}`,
          "--manage-all-nodes=false",
          `--manage-nodes-with-annotation-selector=${FAKE_NODE_ANNOTATION}=fake`,
          "--cidr=10.244.0.0/16",
          "--node-ip=10.250.0.1",
          "--node-lease-duration-seconds=40",
          `--server-address=127.0.0.1:${kwokPort}`,
        ],
        opts.logDir,
      );
      started.push(kwok);

      await kcm.waitUntil(
        "healthy",
        async () =>
          (await httpsGet(`https://127.0.0.1:${kcmPort}/healthz`, undefined)).status === 200,
      );
      await scheduler.waitUntil(
        "healthy",
        async () =>
          (await httpsGet(`https://127.0.0.1:${schedPort}/healthz`, undefined)).status === 200,
      );
      log("kube-controller-manager and kube-scheduler healthy");

      const kc = new KubeConfig();
      kc.loadFromFile(kubeconfig);
      const core = kc.makeApiClient(CoreV1Api);
      const nodeNames: string[] = [];
      for (let i = 0; i < numNodes; i++) {
        const name = `gpu-node-${i}`;
        await core.createNode({ body: fakeGpuNode(name, gpus) });
        nodeNames.push(name);
      }
      await kwok.waitUntil(
        "managing Ready nodes",
        async () => {
          const list = await core.listNode();
          const ready = list.items.filter((n) =>
            n.status?.conditions?.some((c) => c.type === "Ready" && c.status === "True"),
          );
          return ready.length >= numNodes;
        },
        60_000,
      );
      // The controller-manager's service-account controller creates `default` in each namespace;
      // pods cannot be admitted before it exists.
      await kcm.waitUntil(
        "creating default service accounts",
        async () => {
          await core.readNamespacedServiceAccount({ name: "default", namespace: "default" });
          return true;
        },
        60_000,
      );
      log(`${numNodes} fake GPU nodes Ready (${gpus} x nvidia.com/gpu each)`);

      const pids: Record<string, number> = {};
      for (const p of started) if (p.pid !== undefined) pids[p.name] = p.pid;
      return new TestCluster(
        {
          server,
          kubeconfig,
          nobodyKubeconfig,
          caCert: pki.caCert,
          adminToken: pki.tokens.admin,
          etcdUrl,
          nodeNames,
          pids,
        },
        started,
      );
    } catch (err) {
      for (const p of started.reverse()) await p.stop(3000);
      throw err;
    }
  }

  /** Stops the components in reverse start order (kwok first, etcd last). */
  async stop(): Promise<void> {
    for (const p of [...this.#processes].reverse()) await p.stop();
  }
}

/** kwok's standard stages (node initialize + lease heartbeat, pod ready/complete/delete). */
function kwokStages(stageDir: string): string {
  const files = [
    join(stageDir, "node", "fast", "node-initialize.yaml"),
    join(stageDir, "node", "heartbeat-with-lease", "node-heartbeat-with-lease.yaml"),
    ...readdirSync(join(stageDir, "pod", "fast"))
      .filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml")
      .map((f) => join(stageDir, "pod", "fast", f)),
  ];
  return files.map((f) => readFileSync(f, "utf8").trim()).join("\n---\n") + "\n";
}

export type { Pki };
