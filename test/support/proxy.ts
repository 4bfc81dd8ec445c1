// An HTTP proxy for the tests of what honours $HTTP_PROXY / $HTTPS_PROXY (the Hub download,
// src/local/hf-hub.ts): a real forward proxy on loopback, as squid or a corporate proxy would
// be, that relays absolute-form requests (http:// targets) and CONNECT tunnels (https://
// ones), and records each target it was asked for.
import { createServer, request } from "node:http";
import type { AddressInfo } from "node:net";
import { connect } from "node:net";

export interface TestProxy {
  /** http://127.0.0.1:PORT, for $HTTP_PROXY. */
  url: string;
  /** What clients asked for: "GET http://host:port/path" or "CONNECT host:port". */
  seen: string[];
  close(): Promise<void>;
}

export async function startTestProxy(): Promise<TestProxy> {
  const seen: string[] = [];
  const server = createServer((req, res) => {
    seen.push(`${req.method} ${req.url}`);
    let target: URL;
    try {
      target = new URL(req.url ?? "");
    } catch {
      res.writeHead(400).end("absolute-form request expected");
      return;
    }
    const headers = { ...req.headers };
    delete headers["proxy-connection"];
    delete headers["proxy-authorization"];
    const up = request(target, { method: req.method, headers }, (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.headers);
      answer.pipe(res);
    });
    up.on("error", () => res.writeHead(502).end());
    req.pipe(up);
  });
  server.on("connect", (req, socket, head) => {
    seen.push(`CONNECT ${req.url}`);
    const [host, port] = (req.url ?? "").split(":");
    const up = connect(Number(port), host!, () => {
      socket.write("HTTP/1.1 200 Connection Established\r\n\r\n");
      up.write(head);
      up.pipe(socket).pipe(up);
    });
    const drop = () => {
      up.destroy();
      socket.destroy();
    };
    up.on("error", drop);
    socket.on("error", drop);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    seen,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}
