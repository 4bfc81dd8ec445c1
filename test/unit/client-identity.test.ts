// Who a verified client certificate names in the gateway's request log (serving-tls.ts:
// clientIdentity): its CN, else a URI SAN (a SPIFFE ID), else its subject; nothing without one.
import type { PeerCertificate } from "node:tls";
import { describe, expect, it } from "vitest";
import { clientIdentity, socketClientIdentity } from "../../src/gateway/serving-tls.ts";

const cert = (c: Partial<PeerCertificate>) => c as PeerCertificate;

describe("clientIdentity", () => {
  it.each<[string, PeerCertificate | undefined | null, string | undefined]>([
    ["a CN", cert({ subject: { CN: "batch-runner", O: "acme" } as never }), "batch-runner"],
    [
      "a SPIFFE ID and no CN",
      cert({
        subject: { O: "acme" } as never,
        subjectaltname: "DNS:svc.local, URI:spiffe://acme.org/ns/jobs/sa/runner",
      }),
      "spiffe://acme.org/ns/jobs/sa/runner",
    ],
    ["a subject without CN", cert({ subject: { O: "acme", OU: "ml" } as never }), "O=acme, OU=ml"],
    ["no certificate (an empty object)", cert({}), undefined],
    ["undefined", undefined, undefined],
  ])("names %s", (_, c, want) => {
    expect(clientIdentity(c)).toBe(want);
  });

  it("reads a socket's certificate only when the handshake verified it", () => {
    const peer = cert({ subject: { CN: "x" } as never });
    const socket = (authorized: boolean) => ({ authorized, getPeerCertificate: () => peer });
    expect(socketClientIdentity(socket(true))).toBe("x");
    expect(socketClientIdentity(socket(false))).toBeUndefined();
    expect(socketClientIdentity({})).toBeUndefined(); // a plain socket
  });
});
