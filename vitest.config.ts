import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // One run of the real services (NATS, etcd, kube-apiserver, ...) for all test files.
    globalSetup: ["test/env/global-setup.ts"],
    // Files share one cluster and one NATS server; on 2 cores parallel files only contend.
    fileParallelism: false,
    // Scratch arrays handed out full of NaN (src/engine/scratch.ts): an element the forward
    // pass never writes shows in every test, and in the processes the tests start.
    env: { EM_SCRATCH_POISON: "1" },
    testTimeout: 120_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000,
  },
});
