// The batches' shared folder (batch-folder.ts) and parts (batch-runner.ts): how many lines a
// part has, leases between gateways, answers files read whole lines at a time.
import { appendFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseAnswer, readAnswers } from "../../src/gateway/batch-folder.ts";
import { partCount, partLines, partPath } from "../../src/gateway/batch-runner.ts";
import { Leases } from "../../src/util/leases.ts";

describe("partLines", () => {
  it.each([
    [1, 16, 1],
    [16, 16, 1],
    [17, 16, 2],
    [1_024, 16, 64],
    [1_025, 17, 61],
    [10_000, 157, 64],
    [16_384, 256, 64],
    [50_000, 256, 196],
  ])("%i lines: parts of %i, %i of them", (total, size, count) => {
    expect(partLines(total)).toBe(size);
    expect(partCount(total, size)).toBe(count);
  });

  it("names a part's files after its batch and index", () => {
    expect(partPath("/f", "batch_x", 3, "lease")).toBe("/f/batch_x.p3.lease");
    expect(partPath("/f", "batch_x", 0, "errors")).toBe("/f/batch_x.p0.errors.jsonl");
  });
});

describe("readAnswers", () => {
  const dir = mkdtempSync(join(tmpdir(), "answers-"));
  it.each([
    ["none yet", null, 0, false, "", null],
    ["whole lines", "a\nb\n", 0, false, "a\nb\n", "a\nb\n"],
    ["from an offset", "a\nb\n", 2, false, "b\n", "a\nb\n"],
    ["past the end", "a\n", 2, false, "", "a\n"],
    ["a line being written: not yet", "a\nb", 0, false, "a\n", "a\nb"],
    ["a line cut short, cut", "a\nb", 0, true, "a\n", "a\n"],
    ["nothing whole, cut", "abc", 0, true, "", ""],
    ["utf-8 kept whole", "é\n€", 0, false, "é\n", "é\n€"],
  ])("%s", (_, content, offset, cut, read, after) => {
    const path = join(dir, `${Math.random()}.jsonl`);
    if (content !== null) writeFileSync(path, content);
    expect(readAnswers(path, offset, cut)).toBe(read);
    if (after !== null) expect(readFileSync(path, "utf8")).toBe(after);
  });

  it("each read starts where the last ended (bytes of whole lines)", () => {
    const path = join(dir, "grow.jsonl");
    let at = 0;
    const seen: string[] = [];
    for (const chunk of ['{"a":"é"}\n{"b"', ":1}\n", '{"c":2}\n']) {
      appendFileSync(path, chunk);
      const text = readAnswers(path, at);
      at += Buffer.byteLength(text);
      seen.push(text);
    }
    expect(seen).toEqual(['{"a":"é"}\n', '{"b":1}\n', '{"c":2}\n']);
  });

  it.each([
    ["", null],
    ["{damaged", null],
    ['{"custom_id":7}', null],
    ['{"custom_id":"r1","response":null}', "r1"],
  ])("parseAnswer(%j) names %j", (line, id) => {
    expect(parseAnswer(line)?.custom_id ?? null).toBe(id);
  });
});

describe("Leases", () => {
  const dir = mkdtempSync(join(tmpdir(), "leases-"));
  const path = (n: string) => join(dir, `${n}.lease`);

  it("one of two gateways takes a free lease; the other sees it held", () => {
    const a = new Leases(30_000);
    const b = new Leases(30_000);
    expect(b.state(path("one"))).toBe("free");
    expect(a.take(path("one"))).toBe("taken");
    expect(b.take(path("one"))).toBe("held");
    expect(b.state(path("one"))).toBe("held");
    expect(b.renew(path("one"))).toBe(false); // (not its lease)
    expect(a.renew(path("one"))).toBe(true);
    b.release(path("one")); // (not its lease: kept)
    expect(b.state(path("one"))).toBe("held");
    a.release(path("one"));
    expect(b.take(path("one"))).toBe("taken");
    a.close();
    b.close();
  });

  it("a lease marked done is never taken again, even when old", () => {
    const a = new Leases(30_000);
    const b = new Leases(0);
    expect(a.take(path("done"))).toBe("taken");
    a.finish(path("done"));
    expect(b.take(path("done"))).toBe("done");
    expect(b.state(path("done"))).toBe("done");
    a.close();
    b.close();
  });

  it("a lease not renewed in time, or of a process gone, is taken over", () => {
    const a = new Leases(30_000);
    const b = new Leases(30_000);
    expect(a.take(path("old"))).toBe("taken");
    const lease = JSON.parse(readFileSync(path("old"), "utf8"));
    writeFileSync(path("old"), JSON.stringify({ ...lease, at: Date.now() - 31_000 }));
    expect(b.take(path("old"))).toBe("taken");
    expect(a.renew(path("old"))).toBe(false); // (a was too slow: b holds it now)
    // This host, a pid that no longer runs: taken at once.
    writeFileSync(path("dead"), JSON.stringify({ ...lease, pid: 2 ** 22 + 1, at: Date.now() }));
    expect(b.take(path("dead"))).toBe("taken");
    // This process, a Leases closed (a gateway stopped in it): taken at once.
    expect(a.take(path("closed"))).toBe("taken");
    a.close();
    expect(b.take(path("closed"))).toBe("taken");
    b.close();
  });
});
