// A plain Node.js https server in the mesh: it requires a client certificate from our
// CA, answers with the caller's SPIFFE ID, and reloads its own certificate when
// `trustmesh agent` rewrites the files. No trustmesh code, only node:https.
// Usage: node spiffe_server.js DIR   (DIR: the agent's --out, with chain.pem, key.pem, bundle.pem)
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');

const dir = process.argv[2];

function credentials() {
  return {
    cert: fs.readFileSync(path.join(dir, 'chain.pem')), // our certificate and the intermediate
    key: fs.readFileSync(path.join(dir, 'key.pem')),
    ca: fs.readFileSync(path.join(dir, 'bundle.pem')), // trust only our CA's roots
  };
}

// The caller's SPIFFE ID: its certificate's one URI SAN, "URI:spiffe://...".
function spiffeId(cert) {
  const uris = (cert.subjectaltname || '')
    .split(', ')
    .filter((name) => name.startsWith('URI:'))
    .map((name) => name.slice(4));
  return uris.length === 1 && uris[0].startsWith('spiffe://') ? uris[0] : null;
}

const server = https.createServer(
  {
    ...credentials(),
    requestCert: true, // ask every caller for a certificate...
    rejectUnauthorized: true, // ...and refuse the handshake unless it chains to `ca`
    minVersion: 'TLSv1.2',
  },
  (req, res) => {
    const caller = spiffeId(req.socket.getPeerCertificate());
    if (caller === null) {
      res.writeHead(403, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'no SPIFFE ID in the client certificate' }));
      return;
    }
    console.log(`served ${caller}`);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ caller }));
  },
);

// The agent renames each new file into place: reload once they have all landed.
let pending = null;
fs.watch(dir, () => {
  clearTimeout(pending);
  pending = setTimeout(() => {
    try {
      server.setSecureContext(credentials()); // new connections get the new certificate
      console.log('reloaded');
    } catch (err) {
      console.error(`reload failed, keeping the current certificate: ${err.message}`);
    }
  }, 200);
});

server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
