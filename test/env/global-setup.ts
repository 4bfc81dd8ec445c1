// vitest global setup: one test environment (real nats-server + real Kubernetes control
// plane) per run, shared by every test file through `inject("testEnv")`.
import type { TestProject } from "vitest/node";
import { type TestEnvInfo, TestEnvironment } from "./environment.ts";

declare module "vitest" {
  export interface ProvidedContext {
    testEnv: TestEnvInfo;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const log = (msg: string) => process.stderr.write(`[test-env] ${msg}\n`);
  const env = await TestEnvironment.start(log);
  project.provide("testEnv", env.info);

  // Ctrl-C or a kill of the runner: stop the services in order. (Should the runner die
  // without running this, every service still dies with it: see process.ts.)
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= env.stop().then(() => {
      log("environment stopped");
    });
    return stopping;
  };
  const onSignal = (sig: NodeJS.Signals) => {
    void stop().finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  return async () => {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await stop();
  };
}
