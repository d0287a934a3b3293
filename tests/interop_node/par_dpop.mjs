// Drives the token server with oauth4webapi (an independent, spec-strict client library): a
// pushed authorization request (RFC 9126) with PKCE and a DPoP proof (RFC 9449 §10: the code is
// bound to the key), the browser part (sign-in and consent pages) done here with fetch and a
// small cookie jar, then the code redeemed with DPoP, /userinfo with DPoP and a refresh with
// DPoP. Once for a private_key_jwt client and once for a public one. A use_dpop_nonce answer
// is retried once with the nonce the server sent, as oauth4webapi's documentation shows.
// Prints one JSON object with what it saw.
//
// Environment: ISSUER (http://127.0.0.1:PORT), REDIRECT_URI, USER_NAME, USER_PASSWORD,
// KEY_CLIENT_ID and KEY_CLIENT_JWK (its private JWK, with kid), PUBLIC_CLIENT_ID.
import * as oauth from 'oauth4webapi'

const env = process.env
const issuer = new URL(env.ISSUER)
const redirectUri = env.REDIRECT_URI
const insecure = { [oauth.allowInsecureRequests]: true } // the test server is plain http
const as = await oauth.processDiscoveryResponse(
  issuer,
  await oauth.discoveryRequest(issuer, { algorithm: 'oidc', ...insecure }),
)

// -- nonces ------------------------------------------------------------------------------

// One retry on use_dpop_nonce: the handle has cached the DPoP-Nonce of the refusal.
async function withNonceRetry (retries, step, attempt) {
  try {
    return await attempt()
  } catch (err) {
    if (!oauth.isDPoPNonceError(err)) throw err
    retries[step] = (retries[step] ?? 0) + 1
    return attempt()
  }
}

// -- the browser -------------------------------------------------------------------------

class Browser {
  jar = new Map() // cookie name -> value (one host, so the name is enough)

  async go (url, init = {}) {
    const headers = new Headers(init.headers)
    if (this.jar.size) {
      headers.set('cookie', [...this.jar].map(([k, v]) => `${k}=${v}`).join('; '))
    }
    const response = await fetch(new URL(url, issuer), { ...init, headers, redirect: 'manual' })
    for (const line of response.headers.getSetCookie()) {
      const [pair, ...attributes] = line.split(';')
      const at = pair.indexOf('=')
      const name = pair.slice(0, at).trim()
      const value = pair.slice(at + 1).trim()
      const gone = attributes.some((a) => /^\s*max-age\s*=\s*0\s*$/i.test(a)) || value === '' || value === '""'
      if (gone) this.jar.delete(name)
      else this.jar.set(name, value)
    }
    return response
  }

  async post (url, fields) {
    return this.go(url, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams(fields),
    })
  }
}

function unescapeHtml (text) {
  return text.replace(/&(#x[0-9a-f]+|#[0-9]+|amp|lt|gt|quot|apos);/gi, (_, entity) => {
    const named = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" }[entity.toLowerCase()]
    if (named) return named
    return String.fromCodePoint(entity[1].toLowerCase() === 'x' ? parseInt(entity.slice(2), 16) : parseInt(entity.slice(1), 10))
  })
}

// The hidden fields of the page's one form, in order.
function hiddenFields (html) {
  const fields = []
  for (const match of html.matchAll(/<input type="hidden" name="([^"]*)" value="([^"]*)">/g)) {
    fields.push([unescapeHtml(match[1]), unescapeHtml(match[2])])
  }
  return fields
}

function expectStatus (response, status, what) {
  if (response.status !== status) {
    throw new Error(`${what}: expected HTTP ${status}, got ${response.status} (${response.headers.get('location') ?? ''})`)
  }
  return response.headers.get('location')
}

// GET /oauth2/authorize?client_id&request_uri -> sign-in page -> consent page -> the redirect
// to the client, returned as a URL.
async function signInAndConsent (clientId, requestUri) {
  const browser = new Browser()
  const steps = []
  const authorize = new URL(as.authorization_endpoint)
  authorize.searchParams.set('client_id', clientId)
  authorize.searchParams.set('request_uri', requestUri)
  let response = await browser.go(authorize)
  steps.push(response.status)
  const toLogin = new URL(expectStatus(response, 302, 'authorize before sign-in'), issuer)
  if (toLogin.pathname !== '/login') throw new Error(`not sent to /login: ${toLogin}`)

  response = await browser.go(toLogin)
  steps.push(response.status)
  expectStatus(response, 200, 'sign-in page')
  const login = Object.fromEntries(hiddenFields(await response.text()))
  if (!login.csrf_token || !login.next) throw new Error('sign-in page without csrf_token or next')
  response = await browser.post('/login', {
    csrf_token: login.csrf_token,
    next: login.next,
    username: env.USER_NAME,
    password: env.USER_PASSWORD,
  })
  steps.push(response.status)
  const back = expectStatus(response, 303, 'sign-in')

  response = await browser.go(back)
  steps.push(response.status)
  expectStatus(response, 200, 'consent page')
  const page = await response.text()
  if (!page.includes('action="/consent"')) throw new Error('no consent form')
  const fields = hiddenFields(page)
  response = await browser.post('/consent', [...fields, ['decision', 'allow']])
  steps.push(response.status)
  const callback = new URL(expectStatus(response, 303, 'consent'))
  return { steps, callback, consentFields: fields.map(([name]) => name), cookies: [...browser.jar.keys()].sort() }
}

// -- one client --------------------------------------------------------------------------

// freshHandles: a new DPoP handle (same key pair, no nonce cached) for every step, so each
// endpoint's nonce round trip happens; otherwise one handle whose cached nonce carries over.
async function run (client, clientAuth, { freshHandles, boundRefresh }) {
  const retries = {}
  const keyPair = await oauth.generateKeyPair('ES256')
  const shared = oauth.DPoP(client, keyPair)
  const handle = () => (freshHandles ? oauth.DPoP(client, keyPair) : shared)
  const jkt = await shared.calculateThumbprint()
  const publicJwk = await crypto.subtle.exportKey('jwk', keyPair.publicKey)

  // 1. PAR with PKCE S256 and a DPoP proof.
  const codeVerifier = oauth.generateRandomCodeVerifier()
  const state = oauth.generateRandomState()
  const nonce = oauth.generateRandomNonce()
  const parameters = new URLSearchParams({
    redirect_uri: redirectUri,
    response_type: 'code',
    scope: 'openid profile',
    code_challenge: await oauth.calculatePKCECodeChallenge(codeVerifier),
    code_challenge_method: 'S256',
    state,
    nonce,
  })
  const parDPoP = handle()
  const pushed = await withNonceRetry(retries, 'par', async () =>
    oauth.processPushedAuthorizationResponse(
      as,
      client,
      await oauth.pushedAuthorizationRequest(as, client, clientAuth, parameters, { DPoP: parDPoP, ...insecure }),
    ),
  )

  // 2. The browser.
  const browsed = await signInAndConsent(client.client_id, pushed.request_uri)

  // 3. The callback, checked by the library (iss, state), and the code with DPoP.
  const callbackParameters = oauth.validateAuthResponse(as, client, browsed.callback, state)
  const redeemWith = (counts, DPoP) => withNonceRetry(counts, 'token', async () =>
    oauth.processAuthorizationCodeResponse(
      as,
      client,
      await oauth.authorizationCodeGrantRequest(as, client, clientAuth, callbackParameters, redirectUri, codeVerifier, { DPoP, ...insecure }),
      { expectedNonce: nonce },
    ),
  )
  // The code is bound to the key of the PAR proof: a proof with another key is refused, and
  // the refusal does not spend the code.
  const otherKeys = await oauth.generateKeyPair('ES256')
  const otherRetries = {}
  let wrongKey
  try {
    await redeemWith(otherRetries, oauth.DPoP(client, otherKeys))
    wrongKey = { refused: false }
  } catch (err) {
    if (!(err instanceof oauth.ResponseBodyError)) throw err
    wrongKey = { refused: true, status: err.status, error: err.error }
  }
  const tokens = await redeemWith(retries, handle())
  const idToken = oauth.getValidatedIdTokenClaims(tokens)

  // /userinfo with DPoP (Authorization: DPoP, proof with ath); the sub must be the ID token's.
  const userinfoDPoP = handle()
  const userinfo = await withNonceRetry(retries, 'userinfo', async () =>
    oauth.processUserInfoResponse(
      as,
      client,
      idToken.sub,
      await oauth.userInfoRequest(as, client, tokens.access_token, { DPoP: userinfoDPoP, ...insecure }),
    ),
  )
  // The same bound token as a Bearer token (no DPoP handle): refused with a challenge.
  let asBearer
  try {
    await oauth.protectedResourceRequest(tokens.access_token, 'GET', new URL(as.userinfo_endpoint), new Headers(), null, insecure)
    asBearer = { refused: false }
  } catch (err) {
    if (!(err instanceof oauth.WWWAuthenticateChallengeError)) throw err
    asBearer = { refused: true, status: err.response.status, challenges: err.cause }
  }

  // Refresh with DPoP. A public client's refresh token is bound to the key: first with
  // another key, which is refused and ends nothing. (A confidential client's is not bound:
  // a refresh with another key would rotate it, so it is not tried.)
  let refreshWrongKey
  if (boundRefresh) {
    const otherHandle = oauth.DPoP(client, otherKeys)
    try {
      await withNonceRetry(otherRetries, 'refresh', async () =>
        oauth.processRefreshTokenResponse(
          as,
          client,
          await oauth.refreshTokenGrantRequest(as, client, clientAuth, tokens.refresh_token, { DPoP: otherHandle, ...insecure }),
        ),
      )
      refreshWrongKey = { refused: false }
    } catch (err) {
      if (!(err instanceof oauth.ResponseBodyError)) throw err
      refreshWrongKey = { refused: true, status: err.status, error: err.error }
    }
  }
  const refreshDPoP = handle()
  const refreshed = await withNonceRetry(retries, 'refresh', async () =>
    oauth.processRefreshTokenResponse(
      as,
      client,
      await oauth.refreshTokenGrantRequest(as, client, clientAuth, tokens.refresh_token, { DPoP: refreshDPoP, ...insecure }),
    ),
  )
  const refreshedDPoP = handle()
  const refreshedUserinfo = await withNonceRetry(retries, 'userinfo_after_refresh', async () =>
    oauth.processUserInfoResponse(
      as,
      client,
      idToken.sub,
      await oauth.userInfoRequest(as, client, refreshed.access_token, { DPoP: refreshedDPoP, ...insecure }),
    ),
  )

  return {
    client_id: client.client_id,
    jkt,
    public_jwk: publicJwk,
    par: { request_uri: pushed.request_uri, expires_in: pushed.expires_in },
    browser: {
      steps: browsed.steps,
      callback: browsed.callback.href,
      consent_fields: browsed.consentFields,
      cookies: browsed.cookies,
    },
    callback: Object.fromEntries(callbackParameters),
    code_with_other_key: wrongKey,
    token: {
      token_type: tokens.token_type,
      access_token: tokens.access_token,
      has_refresh_token: typeof tokens.refresh_token === 'string',
      scope: tokens.scope,
      id_token_sub: idToken.sub,
    },
    userinfo,
    bound_token_as_bearer: asBearer,
    refresh_with_other_key: refreshWrongKey ?? null,
    refresh: { token_type: refreshed.token_type, access_token: refreshed.access_token },
    refreshed_userinfo: refreshedUserinfo,
    retries,
    other_key_retries: otherRetries,
  }
}

// A private_key_jwt client (its key given by the test) with one DPoP handle for every step.
const jwk = JSON.parse(env.KEY_CLIENT_JWK)
const { kid, ...keyJwk } = jwk
const privateKey = await crypto.subtle.importKey('jwk', keyJwk, { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign'])
const keyClient = { client_id: env.KEY_CLIENT_ID, token_endpoint_auth_method: 'private_key_jwt' }
const byKey = await run(keyClient, oauth.PrivateKeyJwt({ key: privateKey, kid }), { freshHandles: false, boundRefresh: false })

// A public client (no authentication) with a new handle, nonce-less, at every step.
const publicClient = { client_id: env.PUBLIC_CLIENT_ID, token_endpoint_auth_method: 'none' }
const byPublic = await run(publicClient, oauth.None(), { freshHandles: true, boundRefresh: true })

console.log(JSON.stringify({
  metadata: {
    issuer: as.issuer,
    pushed_authorization_request_endpoint: as.pushed_authorization_request_endpoint,
    dpop_signing_alg_values_supported: as.dpop_signing_alg_values_supported,
    jwks_uri: as.jwks_uri,
  },
  private_key_jwt: byKey,
  public: byPublic,
}))
