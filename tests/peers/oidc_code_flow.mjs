// openid-client (v6, npm) runs the authorization code flow with PKCE against
// `trustmesh idp serve`: discovery, a scripted sign-in on the login page (fetch the form,
// post the credentials with its cookie), the code exchange with ID token validation,
// userinfo and a refresh. Prints one JSON object with what it got; exits 1 on error.
//
// Usage: node oidc_code_flow.mjs ISSUER CLIENT_ID CLIENT_SECRET REDIRECT_URI USERNAME PASSWORD_FILE
// The CA bundle comes from NODE_EXTRA_CA_CERTS.
import * as client from 'openid-client';
import { readFileSync } from 'node:fs';

const [issuer, clientId, secret, redirectUri, username, passwordFile] = process.argv.slice(2);
const password = readFileSync(passwordFile, 'utf8').trim();

function unescape(value) {
  return value
    .replaceAll('&quot;', '"')
    .replaceAll('&#x27;', "'")
    .replaceAll('&lt;', '<')
    .replaceAll('&gt;', '>')
    .replaceAll('&amp;', '&');
}

// What a browser does: open the login page, submit the form with the page's cookie.
async function signIn(authorizationUrl) {
  const page = await fetch(authorizationUrl, { redirect: 'manual' });
  if (page.status !== 200) throw new Error(`login page: HTTP ${page.status}`);
  const cookie = page.headers.get('set-cookie').split(';')[0];
  const html = await page.text();
  const action = /<form method="post" action="([^"]+)"/.exec(html)[1];
  const form = new URLSearchParams();
  for (const m of html.matchAll(/<input type="hidden" name="([^"]+)" value="([^"]*)">/g)) {
    form.append(unescape(m[1]), unescape(m[2]));
  }
  form.append('username', username);
  form.append('password', password);
  const posted = await fetch(new URL(unescape(action), authorizationUrl), {
    method: 'POST',
    body: form,
    headers: { cookie },
    redirect: 'manual',
  });
  if (posted.status !== 302) throw new Error(`sign-in: HTTP ${posted.status}`);
  return new URL(posted.headers.get('location'));
}

try {
  const config = await client.discovery(
    new URL(issuer), clientId, undefined, client.ClientSecretBasic(secret));
  const codeVerifier = client.randomPKCECodeVerifier();
  const codeChallenge = await client.calculatePKCECodeChallenge(codeVerifier);
  const state = client.randomState();
  const nonce = client.randomNonce();
  const authorizationUrl = client.buildAuthorizationUrl(config, {
    redirect_uri: redirectUri,
    scope: 'openid profile email',
    code_challenge: codeChallenge,
    code_challenge_method: 'S256',
    state,
    nonce,
  });
  const callback = await signIn(authorizationUrl);
  const tokens = await client.authorizationCodeGrant(config, callback, {
    pkceCodeVerifier: codeVerifier,
    expectedState: state,
    expectedNonce: nonce,
    idTokenExpected: true,
  });
  const claims = tokens.claims();
  const userinfo = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
  const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token);
  let reuse = null;
  try {
    await client.refreshTokenGrant(config, tokens.refresh_token);
  } catch (err) {
    reuse = err.error || err.code || err.name;
  }
  console.log(JSON.stringify({
    issuer: config.serverMetadata().issuer,
    access_token: tokens.access_token,
    scope: tokens.scope,
    id_token_claims: claims,
    userinfo,
    refreshed_access_token: refreshed.access_token,
    refresh_rotated: refreshed.refresh_token !== tokens.refresh_token,
    refreshed_sub: refreshed.claims() ? refreshed.claims().sub : null,
    reuse_error: reuse,
  }));
} catch (err) {
  console.error(`error: ${err.name}: ${err.message} ${err.code || ''} ${JSON.stringify(err.error || err.cause || '')}`);
  process.exit(1);
}
