// Runs the test environment by hand: `npm run env:up` (or node test/env/up.ts).
// Prints how to reach NATS and the API server, and stops everything on Ctrl-C.
import { TestEnvironment } from "./environment.ts";

const log = (msg: string) => process.stderr.write(`[test-env] ${msg}\n`);
const env = await TestEnvironment.start(log);
const { nats, kube, binaries } = env.info;
process.stdout.write(
  [
    `NATS_URL=${nats.url}`,
    `KUBECONFIG=${kube.kubeconfig}`,
    `# kubectl: ${binaries.kubectl} --kubeconfig ${kube.kubeconfig} get nodes`,
    "# Ctrl-C stops everything.",
    "",
  ].join("\n"),
);
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await env.stop();
  log("environment stopped");
  process.exit(0);
};
process.on("SIGINT", stop);
process.on("SIGTERM", stop);
