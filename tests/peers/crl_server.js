// A plain Node.js https server that refuses revoked callers: it requires a client
// certificate from our CA, checks it against the chain CRL `trustmesh agent` keeps fresh,
// and reloads its certificate and the CRL whenever the agent rewrites them.
// Usage: node crl_server.js DIR CRL   (DIR: the agent's --out; CRL: the chain CRL file, PEM)
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');

const [dir, crlFile] = process.argv.slice(2);

// Node reads one CRL per entry of `crl`: split the file into its PEM blocks.
function crls(file) {
  return fs.readFileSync(file, 'ascii').match(/-----BEGIN X509 CRL-----[^-]+-----END X509 CRL-----/g) || [];
}

function options() {
  return {
    cert: fs.readFileSync(path.join(dir, 'chain.pem')), // our certificate and the intermediate
    key: fs.readFileSync(path.join(dir, 'key.pem')),
    ca: fs.readFileSync(path.join(dir, 'bundle.pem')), // trust only our CA's roots
    crl: crls(crlFile), // leaf CRL + root-signed intermediate CRL: Node checks both
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
    ...options(),
    requestCert: true, // ask every caller for a certificate...
    rejectUnauthorized: true, // ...and refuse the handshake unless it chains to `ca`, unrevoked
    minVersion: 'TLSv1.2',
  },
  (req, res) => {
    const cert = req.socket.getPeerCertificate();
    const caller = spiffeId(cert);
    if (caller === null) {
      res.writeHead(403, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'no SPIFFE ID in the client certificate' }));
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ caller, serial: cert.serialNumber.toLowerCase().replace(/^0+/, '') }));
  },
);

// The agent renames new files into place: reload (certificate and CRL) once they have landed.
// setSecureContext applies to new connections; a failed reload keeps the current context.
let pending = null;
function reload() {
  clearTimeout(pending);
  pending = setTimeout(() => {
    try {
      server.setSecureContext(options());
      console.log('reloaded');
    } catch (err) {
      console.error(`reload failed, keeping the current context: ${err.message}`);
    }
  }, 100);
}
fs.watch(dir, reload);
if (path.resolve(path.dirname(crlFile)) !== path.resolve(dir)) fs.watch(path.dirname(crlFile), reload);

server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
