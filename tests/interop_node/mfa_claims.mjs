// amr and acr (RFC 8176, OpenID Connect Core §2) of a sign-in with a second factor, in an ID
// token that oauth4webapi (an independent, spec-strict client library) validates: signature
// (JWKS), iss, aud, nonce, and auth_time against max_age. The browser part is done here with
// fetch and a small cookie jar: sign-in page, the one-time code step (RFC 6238, computed
// here from the secret), the consent page. Prints one JSON object with what it saw.
//
// Environment: ISSUER (http://127.0.0.1:PORT), REDIRECT_URI, CLIENT_ID (a public client),
// USER_NAME, USER_PASSWORD, TOTP_SECRET (base32).
import { createHmac } from 'node:crypto'
import * as oauth from 'oauth4webapi'

const env = process.env
const issuer = new URL(env.ISSUER)
const redirectUri = env.REDIRECT_URI
const insecure = { [oauth.allowInsecureRequests]: true } // the test server is plain http
const MAX_AGE = 300
const as = await oauth.processDiscoveryResponse(
  issuer,
  await oauth.discoveryRequest(issuer, { algorithm: 'oidc', ...insecure }),
)
const client = { client_id: env.CLIENT_ID }

class Browser {
  jar = new Map()

  async go (url, init = {}) {
    const headers = new Headers(init.headers)
    if (this.jar.size) headers.set('cookie', [...this.jar].map(([k, v]) => `${k}=${v}`).join('; '))
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

// The hidden fields of the form whose action is ``action`` (or of the page), in order.
function hiddenFields (html, action) {
  let scope = html
  if (action) {
    const start = html.indexOf(`action="${action}"`)
    if (start < 0) throw new Error(`no form posting to ${action}`)
    scope = html.slice(start, html.indexOf('</form>', start))
  }
  const fields = []
  for (const match of scope.matchAll(/<input type="hidden" name="([^"]*)" value="([^"]*)">/g)) {
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

// RFC 6238 with RFC 4226 §5.3's dynamic truncation: SHA-1, 30 s steps, 6 digits.
function totp (base32, at = Date.now()) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567'
  let bits = ''
  for (const c of base32.replace(/=+$/, '').toUpperCase()) bits += alphabet.indexOf(c).toString(2).padStart(5, '0')
  const key = Buffer.from(bits.match(/.{8}/g).map((b) => parseInt(b, 2)))
  const counter = Buffer.alloc(8)
  counter.writeBigUInt64BE(BigInt(Math.floor(at / 1000 / 30)))
  const mac = createHmac('sha1', key).update(counter).digest()
  const offset = mac[mac.length - 1] & 0xf
  const value = (mac.readUInt32BE(offset) & 0x7fffffff) % 1_000_000
  return String(value).padStart(6, '0')
}

const verifier = oauth.generateRandomCodeVerifier()
const nonce = oauth.generateRandomNonce()
const state = oauth.generateRandomState()
const authorize = new URL(as.authorization_endpoint)
for (const [k, v] of Object.entries({
  client_id: client.client_id,
  redirect_uri: redirectUri,
  response_type: 'code',
  scope: 'openid profile',
  code_challenge: await oauth.calculatePKCECodeChallenge(verifier),
  code_challenge_method: 'S256',
  nonce,
  state,
  max_age: String(MAX_AGE),
  acr_values: '2',
})) authorize.searchParams.set(k, v)

const browser = new Browser()
const steps = []
let response = await browser.go(authorize)
steps.push(response.status)
const toLogin = new URL(expectStatus(response, 302, 'authorize before sign-in'), issuer)
response = await browser.go(toLogin)
steps.push(response.status)
expectStatus(response, 200, 'sign-in page')
const login = Object.fromEntries(hiddenFields(await response.text(), '/login'))
response = await browser.post('/login', { ...login, username: env.USER_NAME, password: env.USER_PASSWORD })
steps.push(response.status)
const toVerify = new URL(expectStatus(response, 303, 'password'), issuer)
if (toVerify.pathname !== '/login/verify') throw new Error(`not sent to the second step: ${toVerify}`)
response = await browser.go(toVerify)
steps.push(response.status)
expectStatus(response, 200, 'second-step page')
const second = Object.fromEntries(hiddenFields(await response.text(), '/login/verify/code'))
if (!second.csrf_token) throw new Error('second-step page without csrf_token')
response = await browser.post('/login/verify/code', { ...second, code: totp(env.TOTP_SECRET) })
steps.push(response.status)
const back = expectStatus(response, 303, 'one-time code')
response = await browser.go(back)
steps.push(response.status)
let callback
if (response.status === 200) {
  const fields = hiddenFields(await response.text(), '/consent')
  response = await browser.post('/consent', [...fields, ['decision', 'allow']])
  steps.push(response.status)
  callback = new URL(expectStatus(response, 303, 'consent'))
} else {
  callback = new URL(expectStatus(response, 302, 'authorize after sign-in'))
}

const params = oauth.validateAuthResponse(as, client, callback, state)
const tokenResponse = await oauth.authorizationCodeGrantRequest(
  as, client, oauth.None(), params, redirectUri, verifier, insecure,
)
const result = await oauth.processAuthorizationCodeResponse(as, client, tokenResponse, {
  expectedNonce: nonce,
  maxAge: MAX_AGE,
  requireIdToken: true,
})
// The ID token's signature, with the server's JWKS (fetched by the library).
await oauth.validateApplicationLevelSignature(as, tokenResponse, insecure)
const claims = oauth.getValidatedIdTokenClaims(result)
console.log(JSON.stringify({ steps, claims }))
