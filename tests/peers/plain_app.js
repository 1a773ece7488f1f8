// A plain Node.js HTTP app, the kind that sits behind `trustmesh proxy inbound --http`.
// Usage: node plain_app.js RECORD_FILE
// Listens on 127.0.0.1 (a free port), prints "listening PORT", appends one JSON line per
// request to RECORD_FILE ({method, url, headers}) and answers with the caller the sidecar
// names and every header it received. GET /slow?ms=N answers after N milliseconds.
"use strict";
const fs = require("node:fs");
const http = require("node:http");

const record = process.argv[2];
if (!record) {
  console.error("usage: node plain_app.js RECORD_FILE");
  process.exit(2);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks).toString("utf8");
    const seen = { method: req.method, url: req.url, headers: req.headers, raw: req.rawHeaders, body };
    fs.appendFileSync(record, JSON.stringify(seen) + "\n");
    const url = new URL(req.url, "http://app");
    const answer = () => {
      const payload = JSON.stringify({
        caller: req.headers["x-trustmesh-caller"] || null,
        headers: req.headers,
        body,
      });
      res.writeHead(200, { "content-type": "application/json" });
      res.end(payload);
    };
    if (url.pathname === "/slow") {
      setTimeout(answer, Number(url.searchParams.get("ms") || "1000"));
    } else {
      answer();
    }
  });
});
server.keepAliveTimeout = 30000;
server.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
