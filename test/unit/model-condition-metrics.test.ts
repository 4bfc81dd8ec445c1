// The models' conditions on the operator's /metrics (src/operator/metrics.ts).
import { Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { ModelConditionMetrics } from "../../src/operator/metrics.ts";

/** The expertmesh_model_condition series of the registry, as label strings. */
async function series(registry: Registry): Promise<string[]> {
  const text = await registry.metrics();
  return text
    .split("\n")
    .filter((l) => l.startsWith("expertmesh_model_condition{"))
    .map((l) => l.replace(/^expertmesh_model_condition/, ""))
    .sort();
}

const c = (type: string, status: string, reason: string) => ({ type, status, reason });

describe("ModelConditionMetrics", () => {
  it("one series per condition, replaced when status or reason changes, gone with the model", async () => {
    const registry = new Registry();
    const m = new ModelConditionMetrics(registry);
    m.set("ns", "a", [
      c("Ready", "False", "ContainerCrashing"),
      c("Degraded", "True", "ContainerCrashing"),
    ]);
    m.set("ns", "b", [c("Ready", "True", "AllReplicasReady")]);
    expect(await series(registry)).toEqual([
      '{namespace="ns",model="a",condition="Degraded",status="True",reason="ContainerCrashing"} 1',
      '{namespace="ns",model="a",condition="Ready",status="False",reason="ContainerCrashing"} 1',
      '{namespace="ns",model="b",condition="Ready",status="True",reason="AllReplicasReady"} 1',
    ]);
    // a recovers: its old series go (a stale "False" would keep an alert firing).
    m.set("ns", "a", [
      c("Ready", "True", "AllReplicasReady"),
      c("Degraded", "False", "AsExpected"),
    ]);
    expect(await series(registry)).toEqual([
      '{namespace="ns",model="a",condition="Degraded",status="False",reason="AsExpected"} 1',
      '{namespace="ns",model="a",condition="Ready",status="True",reason="AllReplicasReady"} 1',
      '{namespace="ns",model="b",condition="Ready",status="True",reason="AllReplicasReady"} 1',
    ]);
    m.forget("ns", "a");
    m.forget("ns", "never-seen");
    expect(await series(registry)).toEqual([
      '{namespace="ns",model="b",condition="Ready",status="True",reason="AllReplicasReady"} 1',
    ]);
  });
});
