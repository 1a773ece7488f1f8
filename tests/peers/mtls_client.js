// A plain Node.js https client using the PEM files `trustmesh issue` writes.
// Usage: node mtls_client.js URL CHAIN KEY BUNDLE
const https = require('https');
const fs = require('fs');
const [url, chain, key, bundle] = process.argv.slice(2);
const req = https.get(url, {
  cert: fs.readFileSync(chain),
  key: fs.readFileSync(key),
  ca: fs.readFileSync(bundle),
  minVersion: 'TLSv1.2',
}, (res) => {
  let body = '';
  res.on('data', (chunk) => { body += chunk; });
  res.on('end', () => { console.log(`${res.statusCode} ${body}`); });
});
req.on('error', (err) => { console.error(`error: ${err.code || ''} ${err.message}`); process.exit(1); });
