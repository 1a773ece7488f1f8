// openid-client (v6, npm) against `trustmesh idp serve`: discovery, client_credentials,
// introspection, revocation. Prints one JSON object with what it got; exits 1 on error.
//
// Usage: node oidc_client.mjs ISSUER CLIENT_ID AUTH SECRET_OR_JWK_FILE [SCOPE]
//   AUTH: basic | post | private_key_jwt (then the 4th argument is a file with a private JWK)
// The CA bundle comes from NODE_EXTRA_CA_CERTS.
import * as client from 'openid-client';
import { readFileSync } from 'node:fs';

const [issuer, clientId, auth, credential, scope] = process.argv.slice(2);

async function clientAuth() {
  if (auth === 'basic') return client.ClientSecretBasic(credential);
  if (auth === 'post') return client.ClientSecretPost(credential);
  if (auth === 'private_key_jwt') {
    const jwk = JSON.parse(readFileSync(credential, 'utf8'));
    const key = await crypto.subtle.importKey(
      'jwk', jwk, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign']);
    return client.PrivateKeyJwt({ key, kid: jwk.kid });
  }
  throw new Error(`unknown auth ${auth}`);
}

try {
  const config = await client.discovery(new URL(issuer), clientId, undefined, await clientAuth());
  const metadata = config.serverMetadata();
  const tokens = await client.clientCredentialsGrant(config, scope ? { scope } : {});
  const before = await client.tokenIntrospection(config, tokens.access_token);
  await client.tokenRevocation(config, tokens.access_token);
  const after = await client.tokenIntrospection(config, tokens.access_token);
  console.log(JSON.stringify({
    issuer: metadata.issuer,
    token_endpoint: metadata.token_endpoint,
    access_token: tokens.access_token,
    token_type: tokens.token_type,
    expires_in: tokens.expires_in,
    scope: tokens.scope,
    introspection_before: before,
    introspection_after: after,
  }));
} catch (err) {
  console.error(`error: ${err.name}: ${err.message} ${err.code || ''} ${JSON.stringify(err.error || err.cause || '')}`);
  process.exit(1);
}
