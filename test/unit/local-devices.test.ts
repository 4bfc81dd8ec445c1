// `expertmesh up --device`: where each role runs, from the manifest's GPU requests and the
// CUDA devices this machine has (src/local/devices.ts).
import { describe, expect, it } from "vitest";
import { localDevices, parseDeviceFlag } from "../../src/local/devices.ts";

const none = { devices: 0, status: "built without CUDA" };
const two = { devices: 2, status: "2 CUDA device(s)" };
const both = { gateway: 1, perShard: 1 };

describe("up --device", () => {
  it.each([
    // flag, manifest GPUs, machine, shard 0..3, gateway
    ["auto", both, two, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "cuda:0"],
    ["cuda", both, two, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "cuda:0"],
    ["auto", { gateway: 0, perShard: 1 }, two, ["cuda:0", "cuda:1", "cuda:0", "cuda:1"], "cpu"],
    ["auto", { gateway: 1, perShard: 0 }, two, ["cpu", "cpu", "cpu", "cpu"], "cuda:0"],
    ["auto", both, none, ["cpu", "cpu", "cpu", "cpu"], "cpu"],
    ["cpu", both, two, ["cpu", "cpu", "cpu", "cpu"], "cpu"],
    ["cuda", { gateway: 0, perShard: 0 }, two, ["cpu", "cpu", "cpu", "cpu"], "cpu"],
  ] as const)("%s, manifest %j, %j", (flag, gpus, cuda, shards, gateway) => {
    const d = localDevices(flag, gpus, cuda);
    expect([0, 1, 2, 3].map(d.shard)).toEqual(shards);
    expect(d.gateway).toBe(gateway);
    expect(d.note).toMatch(/^devices: /);
  });

  it("says why it stays on the CPU, and refuses cuda without a device", () => {
    expect(localDevices("auto", both, none).note).toContain("built without CUDA");
    expect(() => localDevices("cuda", both, none)).toThrow(
      expect.objectContaining({ code: "EM_NATIVE_UNSUPPORTED" }),
    );
    expect(() => parseDeviceFlag("gpu")).toThrow(expect.objectContaining({ code: "EM_CLI_USAGE" }));
    expect(parseDeviceFlag(undefined)).toBe("auto");
  });
});
