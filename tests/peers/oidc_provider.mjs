// Node's oidc-provider (npm), a standard OpenID provider we did not write, for
// trustmesh's token-verifier peer test (tests/test_tokens_peer.py).
//
// usage: node oidc_provider.mjs PORT CHAIN_PEM KEY_PEM BUNDLE_PEM
//
// Serves HTTPS on 127.0.0.1:PORT (0: a free port, no race with other processes) with
// the given certificate (from trustmesh's CA) and issuer https://127.0.0.1:PORT,
// printed as "listening ISSUER" once it answers; client certificates are requested and checked
// against BUNDLE_PEM. The client svc-billing gets client_credentials access tokens
// for resource indicators (RFC 8707) whose audience is "orders"; svc-bound gets
// certificate-bound ones (RFC 8705, cnf.x5t#S256 of its mTLS certificate):
//   https://orders.example/es256   JWT access token (RFC 9068) signed ES256
//   https://orders.example/rs256   JWT access token signed RS256
//   https://orders.example/opaque  opaque access token, for introspection by rs-orders
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';

import Provider, { errors } from 'oidc-provider';

const [port, chainFile, keyFile, bundleFile] = process.argv.slice(2);

const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

const resources = {
  'https://orders.example/es256': { format: 'jwt', alg: 'ES256' },
  'https://orders.example/rs256': { format: 'jwt', alg: 'RS256' },
  'https://orders.example/opaque': { format: 'opaque' },
};

const configuration = {
  clients: [
    {
      client_id: 'svc-billing',
      client_secret: 'billing-secret-0123456789abcdef',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'orders:read orders:write',
    },
    {
      client_id: 'svc-bound',
      client_secret: 'bound-secret-0123456789abcdef',
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      scope: 'orders:read',
      tls_client_certificate_bound_access_tokens: true,
    },
    {
      client_id: 'rs-orders',
      client_secret: 'rs-secret-0123456789abcdef',
      grant_types: [],
      redirect_uris: [],
      response_types: [],
    },
  ],
  jwks: {
    keys: [
      { ...ec, kid: 'node-ec', use: 'sig', alg: 'ES256' },
      { ...rsa, kid: 'node-rsa', use: 'sig', alg: 'RS256' },
    ],
  },
  scopes: ['orders:read', 'orders:write'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    mTLS: {
      enabled: true,
      certificateBoundAccessTokens: true,
      // The TLS layer verified the chain against BUNDLE_PEM; hand over the leaf.
      getCertificate: (ctx) => (ctx.socket.authorized ? ctx.socket.getPeerX509Certificate() : undefined),
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => 'https://orders.example/es256',
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        const info = resources[resource];
        if (!info) throw new errors.InvalidTarget();
        return {
          scope: 'orders:read orders:write',
          audience: 'orders',
          accessTokenTTL: 600,
          accessTokenFormat: info.format,
          ...(info.alg ? { jwt: { sign: { alg: info.alg } } } : {}),
        };
      },
    },
  },
};

const server = https.createServer({
  cert: fs.readFileSync(chainFile),
  key: fs.readFileSync(keyFile),
  ca: fs.readFileSync(bundleFile),
  requestCert: true,
  rejectUnauthorized: false,
});
server.listen(Number(port), '127.0.0.1', () => {
  // The issuer names the port actually bound, so the provider is made after listen().
  const issuer = `https://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration);
  server.on('request', provider.callback());
  console.log(`listening ${issuer}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
