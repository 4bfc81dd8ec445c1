// Tests that need no services (test/unit, test/engine, the progress display of local mode):
// `npm run test:unit`.
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/unit/**/*.test.ts", "test/engine/**/*.test.ts", "test/local/progress.test.ts"],
    // As in vitest.config.ts: scratch arrays handed out full of NaN.
    env: { EM_SCRATCH_POISON: "1" },
    testTimeout: 60_000,
    hookTimeout: 180_000,
    teardownTimeout: 60_000,
  },
});
