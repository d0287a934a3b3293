// node-oidc-provider as the peer `make bench` measures beside the token server.
//
//   node server.mjs PORT [WORKERS]      (or BENCH_PEER_PORT / BENCH_PEER_WORKERS)
//
// One confidential client (client_secret_basic, grant client_credentials, scope "api"); the
// default in-memory adapter; client_credentials tokens are RS256 JWT access tokens for one
// resource server. The primary generates one RSA-2048 key and starts WORKERS processes with
// node's cluster module (the same count as the token server it is compared with); they share
// the port and the key, so any worker's token verifies against any worker's JWKS.
import cluster from 'node:cluster';
import { generateKeyPairSync } from 'node:crypto';
import { createServer } from 'node:http';

const port = Number(process.argv[2] ?? process.env.BENCH_PEER_PORT ?? 3000);
const workers = Number(process.argv[3] ?? process.env.BENCH_PEER_WORKERS ?? 2);
const issuer = `http://127.0.0.1:${port}`;
const resource = `${issuer}/api`;

// The harness passes the client's credentials; these defaults are for running it by hand.
const clientId = process.env.BENCH_PEER_CLIENT_ID ?? 'bench-cc';
const clientSecret = process.env.BENCH_PEER_CLIENT_SECRET ?? 'bench-cc-secret';

if (cluster.isPrimary) {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'bench-rs256', alg: 'RS256', use: 'sig' };
  const env = { BENCH_PEER_JWK: JSON.stringify(jwk) };
  for (let i = 0; i < workers; i += 1) cluster.fork(env);
  let stopping = false;
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) {
      console.error(`worker ${worker.process.pid} exited (${signal ?? code}); stopping`);
      process.exit(1);
    }
  });
  const stop = () => {
    stopping = true;
    for (const worker of Object.values(cluster.workers)) worker.kill('SIGTERM');
    setTimeout(() => process.exit(0), 2000).unref();
    cluster.disconnect(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const { default: Provider } = await import('oidc-provider');
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: clientId,
        client_secret: clientSecret,
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: 'api',
      },
    ],
    scopes: ['api'],
    jwks: { keys: [JSON.parse(process.env.BENCH_PEER_JWK)] },
    cookies: { keys: ['bench-peer-cookie-key'] },
    ttl: { ClientCredentials: 3600 },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        useGrantedResource: () => true,
        getResourceServerInfo: () => ({
          scope: 'api',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 3600,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  // Quiet: no request logging; a server error is one line on stderr (the harness's log file).
  provider.on('server_error', (_ctx, error) => console.error('server_error', error));
  createServer(provider.callback()).listen(port, '127.0.0.1');
}
