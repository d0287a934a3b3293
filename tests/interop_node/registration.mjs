// Drives the token server with oauth4webapi (an independent, spec-strict client library):
// RFC 7591 registration, then private_key_jwt and client_secret_jwt (RFC 7523 §2.2) at the
// token and introspection endpoints. Prints one JSON object with what it saw.
// Environment: ISSUER (http://127.0.0.1:PORT), INITIAL_ACCESS_TOKEN.
import * as oauth from 'oauth4webapi'

const issuer = new URL(process.env.ISSUER)
const insecure = { [oauth.allowInsecureRequests]: true } // the test server is plain http
const as = await oauth.processDiscoveryResponse(
  issuer,
  await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...insecure }),
)

async function register (metadata) {
  const response = await oauth.dynamicClientRegistrationRequest(as, metadata, {
    initialAccessToken: process.env.INITIAL_ACCESS_TOKEN,
    ...insecure,
  })
  return oauth.processDynamicClientRegistrationResponse(response)
}

async function tokenAndIntrospection (client, clientAuth) {
  const tokens = await oauth.processClientCredentialsResponse(
    as,
    client,
    await oauth.clientCredentialsGrantRequest(as, client, clientAuth, {}, insecure),
  )
  const introspection = await oauth.processIntrospectionResponse(
    as,
    client,
    await oauth.introspectionRequest(as, client, clientAuth, tokens.access_token, insecure),
  )
  return { token_type: tokens.token_type, access_token: tokens.access_token, introspection }
}

// private_key_jwt with an ES256 key made here; only the public half is registered.
const { privateKey, publicKey } = await oauth.generateKeyPair('ES256', { extractable: true })
const jwk = await crypto.subtle.exportKey('jwk', publicKey)
const kid = 'interop-1'
const keyClient = await register({
  client_name: 'oauth4webapi private_key_jwt',
  grant_types: ['client_credentials'],
  token_endpoint_auth_method: 'private_key_jwt',
  jwks: { keys: [{ ...jwk, kid, alg: 'ES256', use: 'sig' }] },
})
const byKey = await tokenAndIntrospection(keyClient, oauth.PrivateKeyJwt({ key: privateKey, kid }))

// client_secret_jwt: the secret the registration answered keys an HS256 assertion.
const secretClient = await register({
  client_name: 'oauth4webapi client_secret_jwt',
  grant_types: ['client_credentials'],
  token_endpoint_auth_method: 'client_secret_jwt',
})
const bySecret = await tokenAndIntrospection(
  secretClient,
  oauth.ClientSecretJwt(secretClient.client_secret),
)

// A replayed assertion: the same signed JWT sent twice (the library signs a fresh one per
// request, so the test captures one through a custom fetch and sends it again itself).
let captured
await oauth.clientCredentialsGrantRequest(as, keyClient, oauth.PrivateKeyJwt({ key: privateKey, kid }), {}, {
  ...insecure,
  [oauth.customFetch]: async (url, init) => {
    captured = init.body.toString()
    return fetch(url, init)
  },
})
const replay = await fetch(as.token_endpoint, {
  method: 'POST',
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  body: captured,
})

console.log(JSON.stringify({
  metadata: as,
  private_key_jwt: { client_id: keyClient.client_id, method: keyClient.token_endpoint_auth_method, has_secret: 'client_secret' in keyClient, ...byKey },
  client_secret_jwt: { client_id: secretClient.client_id, method: secretClient.token_endpoint_auth_method, ...bySecret },
  replay: { status: replay.status, body: await replay.json() },
}))
