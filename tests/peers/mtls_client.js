// A plain Node.js https client using the PEM files `trustmesh issue` or `trustmesh agent` write.
// Usage: node mtls_client.js URL CHAIN KEY BUNDLE [SERVER_SPIFFE_ID]
// With SERVER_SPIFFE_ID the server is checked by its SPIFFE ID instead of its host name
// (agent-issued certificates carry only the SPIFFE ID, no DNS name).
const https = require('node:https');
const fs = require('node:fs');

const [url, chain, key, bundle, serverId] = process.argv.slice(2);

// Accept the server only if its certificate's URI SAN is the expected SPIFFE ID.
// The chain to our CA is verified before this is called.
function checkSpiffeId(expected) {
  return (_host, cert) => {
    const uris = (cert.subjectaltname || '').split(', ').filter((n) => n.startsWith('URI:'));
    if (uris.length === 1 && uris[0] === `URI:${expected}`) return undefined;
    return new Error(`server is ${cert.subjectaltname}, expected ${expected}`);
  };
}

// The agent renames chain.pem and key.pem into place one after the other, so a read that
// falls between the two pairs a new chain with the old key (Node throws "key values
// mismatch"): read both again, a few times, before giving up.
function call(attempt) {
  let req;
  try {
    req = https.get(url, {
      cert: fs.readFileSync(chain),
      key: fs.readFileSync(key),
      ca: fs.readFileSync(bundle),
      minVersion: 'TLSv1.2',
      ...(serverId ? { checkServerIdentity: checkSpiffeId(serverId) } : {}),
    }, (res) => {
      let body = '';
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => { console.log(`${res.statusCode} ${body}`); });
    });
  } catch (err) {
    if (attempt < 5 && /KEY_VALUES_MISMATCH|key values mismatch/.test(`${err.code} ${err.message}`)) {
      setTimeout(() => call(attempt + 1), 100);
      return;
    }
    throw err;
  }
  req.on('error', (err) => { console.error(`error: ${err.code || ''} ${err.message}`); process.exit(1); });
}
call(0);
