// A plain Node.js TCP app behind `trustmesh proxy inbound` (TCP mode) that parses the
// PROXY protocol v2 header the sidecar sends first.
// Usage: node proxy_v2_app.js RECORD_FILE
// Listens on 127.0.0.1 (a free port) and prints "listening PORT". It appends
// {"event": "connection"} to RECORD_FILE for every connection it accepts, then one JSON
// line with the parsed header ({source, destination, tlvs, spiffe_id,
// ssl}) or {error, raw} when the first bytes are not a PROXY v2 header. It writes the same
// JSON line back to the client, then echoes every later byte.
"use strict";
const fs = require("node:fs");
const net = require("node:net");

const SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
const record = process.argv[2];

function ip(buf, v6) {
  if (!v6) return Array.from(buf).join(".");
  const parts = [];
  for (let i = 0; i < 16; i += 2) parts.push(buf.readUInt16BE(i).toString(16));
  return parts.join(":");
}

function tlvs(buf) {
  const out = [];
  let at = 0;
  while (at + 3 <= buf.length) {
    const type = buf[at];
    const length = buf.readUInt16BE(at + 1);
    out.push({ type, value: buf.subarray(at + 3, at + 3 + length) });
    at += 3 + length;
  }
  return out;
}

function parse(header) {
  const verCmd = header[12];
  const family = header[13];
  const length = header.readUInt16BE(14);
  const body = header.subarray(16, 16 + length);
  const v6 = family === 0x21;
  const size = v6 ? 16 : 4;
  const result = {
    version: verCmd >> 4,
    command: verCmd & 0x0f,
    family,
    source: { address: ip(body.subarray(0, size), v6), port: body.readUInt16BE(2 * size) },
    destination: { address: ip(body.subarray(size, 2 * size), v6), port: body.readUInt16BE(2 * size + 2) },
    tlvs: {},
    spiffe_id: null,
    unique_id: null,
    ssl: null,
  };
  for (const { type, value } of tlvs(body.subarray(2 * size + 4))) {
    result.tlvs[`0x${type.toString(16)}`] = value.toString("hex");
    if (type === 0xe0) result.spiffe_id = value.toString("utf8");
    if (type === 0x05) result.unique_id = value.toString("utf8");
    if (type === 0x20) {
      const ssl = { client: value[0], verify: value.readUInt32BE(1), version: null, cn: null, cipher: null };
      for (const sub of tlvs(value.subarray(5))) {
        if (sub.type === 0x21) ssl.version = sub.value.toString("utf8");
        if (sub.type === 0x22) ssl.cn = sub.value.toString("utf8");
        if (sub.type === 0x23) ssl.cipher = sub.value.toString("utf8");
      }
      result.ssl = ssl;
    }
  }
  return { result, used: 16 + length };
}

const server = net.createServer((socket) => {
  fs.appendFileSync(record, JSON.stringify({ event: "connection" }) + "\n");
  let buffered = Buffer.alloc(0);
  let parsed = false;
  const report = (entry) => {
    fs.appendFileSync(record, JSON.stringify(entry) + "\n");
    socket.write(JSON.stringify(entry) + "\n");
  };
  socket.on("data", (chunk) => {
    if (parsed) {
      socket.write(chunk);
      return;
    }
    buffered = Buffer.concat([buffered, chunk]);
    if (buffered.length < 16) return;
    if (!buffered.subarray(0, 12).equals(SIGNATURE)) {
      parsed = true;
      report({ error: "no PROXY v2 signature", raw: buffered.toString("utf8") });
      return;
    }
    const total = 16 + buffered.readUInt16BE(14);
    if (buffered.length < total) return;
    const { result, used } = parse(buffered);
    parsed = true;
    report(result);
    const rest = buffered.subarray(used);
    if (rest.length) socket.write(rest);
  });
  socket.on("end", () => socket.end());
  socket.on("error", () => socket.destroy());
});
server.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
