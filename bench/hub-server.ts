// The fetch suite's Hub: test/support/hub.ts's stand-in (the Hub cannot be reached from the
// machines the benchmarks run on) serving the files of a folder, in a process of its own so
// that the client measured has its event loop and core to itself. Prints the endpoint, then
// serves until stdin ends or a signal comes.
//
//   node bench/hub-server.ts REPO DIR
import { startStandInHub } from "../test/support/hub.ts";

const [repo, dir] = process.argv.slice(2);
if (!repo || !dir) {
  console.error("usage: node bench/hub-server.ts REPO DIR");
  process.exit(2);
}
const hub = await startStandInHub({ repo, dir });
process.stdout.write(`${hub.endpoint}\n`);
const close = () => void hub.close().finally(() => process.exit(0));
process.stdin.on("end", close).resume();
process.on("SIGTERM", close);
