'use strict';
// Test helpers (require('fleet-ipc/src/testing')): real processes for tests — an
// ipc-server on free ports (ready when it prints `listening grpc=ADDR metrics=ADDR`),
// and any child whose stdout lines a test waits for. Waiting is on those lines,
// never on sleeps; WAIT_LIMIT_MS only bounds failure. CuttingProxy loses the answer
// of one call on a real connection.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const readline = require('node:readline');

const WAIT_LIMIT_MS = 30000;
const ROOT = path.resolve(__dirname, '../../..'); // the checkout, from clients/node/src
const READY_LINE = /^listening grpc=(\S+) metrics=(\S+)$/;

function serverBinary() {
  const binary = process.env.IPC_SERVER_BIN || path.join(ROOT, 'target/debug/ipc-server');
  if (!fs.existsSync(binary)) {
    throw new Error(`${binary} not found: build it with \`cargo build -p ipc-server\``);
  }
  return binary;
}

/** A child process whose stdout lines can be awaited with `waitFor`. */
class Child {
  constructor(command, args, options = {}) {
    this.argv = [command, ...args];
    this.proc = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
    this.lines = [];
    this.stderr = '';
    this._pending = []; // lines not yet taken by waitFor
    this._waiters = [];
    this._ended = false;
    this.proc.stderr.on('data', (chunk) => {
      this.stderr += chunk;
    });
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => {
      this.lines.push(line);
      this._pending.push(line);
      this._notify();
    });
    this.exited = new Promise((resolve) => {
      this.proc.on('close', (code, signal) => {
        this._ended = true;
        this._notify();
        resolve(code === null ? signal : code);
      });
    });
  }

  _notify() {
    for (const waiter of [...this._waiters]) waiter();
  }

  describe() {
    return `\`${this.argv.join(' ')}\`\n--- stdout ---\n${this.lines.slice(-40).join('\n')}\n--- stderr ---\n${this.stderr
      .split('\n')
      .slice(-40)
      .join('\n')}`;
  }

  /** The next stdout line matching `match` (RegExp or predicate). */
  waitFor(match, what = String(match), limitMs = WAIT_LIMIT_MS) {
    const test = typeof match === 'function' ? match : (line) => match.test(line);
    return new Promise((resolve, reject) => {
      const check = () => {
        while (this._pending.length) {
          const line = this._pending.shift();
          if (test(line)) return done(null, line);
        }
        if (this._ended) done(new Error(`output ended before a line ${what} from ${this.describe()}`));
      };
      const timer = setTimeout(
        () => done(new Error(`no line ${what} within ${limitMs / 1000}s from ${this.describe()}`)),
        limitMs,
      );
      const done = (error, line) => {
        clearTimeout(timer);
        this._waiters = this._waiters.filter((waiter) => waiter !== check);
        if (error) reject(error);
        else resolve(line);
      };
      this._waiters.push(check);
      check();
    });
  }

  /** Send `signal` and resolve to the exit code; fails if it does not exit in time. */
  async stop(signal = 'SIGTERM', limitMs = WAIT_LIMIT_MS) {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => {
        this.proc.kill('SIGKILL');
        reject(new Error(`did not exit within ${limitMs / 1000}s: ${this.describe()}`));
      }, limitMs);
    });
    try {
      return await Promise.race([this.exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  kill() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

/**
 * Start a real ipc-server; resolves once it is serving. `listen` may name the
 * address of a stopped server, to restart "it".
 */
async function startServer({ app = 'shop', args = [], listen = '127.0.0.1:0' } = {}) {
  const server = new Child(
    serverBinary(),
    ['--listen', listen, '--metrics-listen', '127.0.0.1:0', '--app', app, ...args],
    { env: { RUST_LOG: 'info', ...process.env } },
  );
  try {
    const ready = READY_LINE.exec(await server.waitFor(READY_LINE, 'listening grpc=ADDR metrics=ADDR'));
    server.grpcAddr = ready[1];
    server.metricsAddr = ready[2];
  } catch (error) {
    server.kill();
    throw error;
  }
  return server;
}

/**
 * Start a real ipc-sidecar serving `socket` for a pod and relaying to `upstream`;
 * resolves once it prints `listening socket=... health=...`.
 */
async function startSidecar({ socket, upstream, app = 'shop', args = [] }) {
  const binary = process.env.IPC_SIDECAR_BIN || path.join(ROOT, 'target/debug/ipc-sidecar');
  if (!fs.existsSync(binary)) {
    throw new Error(`${binary} not found: build it with \`cargo build -p ipc-sidecar\``);
  }
  const sidecar = new Child(binary, ['--socket', socket, '--upstream', upstream, '--app', app, ...args], {
    env: { RUST_LOG: 'info', ...process.env },
  });
  try {
    const ready = await sidecar.waitFor(/^listening socket=/, 'listening socket=PATH health=ADDR');
    // Where it serves /healthz, /readyz and /metrics.
    sidecar.healthAddr = ready.split(' health=')[1];
  } catch (error) {
    sidecar.kill();
    throw error;
  }
  return sidecar;
}

// HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
const FRAME_HEADER = 9;
const HEADERS_FRAME = 0x1;

/**
 * A TCP proxy in front of a gRPC server that can lose one answer. Once `arm()`-ed,
 * it cuts the connection when the server's response headers of the next call come
 * back: the server did the work, the client never hears of it and sees UNAVAILABLE —
 * what a lost answer looks like when a connection or a replica dies at the wrong
 * moment. `cut` is true once it happened. Start with `await CuttingProxy.start(addr)`.
 */
class CuttingProxy {
  static async start(upstream) {
    const proxy = new CuttingProxy(upstream);
    await new Promise((resolve) => proxy._server.listen(0, '127.0.0.1', resolve));
    proxy.addr = `127.0.0.1:${proxy._server.address().port}`;
    return proxy;
  }

  constructor(upstream) {
    const colon = upstream.lastIndexOf(':');
    this._host = upstream.slice(0, colon) || '127.0.0.1';
    this._port = Number(upstream.slice(colon + 1));
    this._armed = false;
    this.cut = false;
    this._sockets = new Set();
    this._server = net.createServer((client) => this._relay(client));
  }

  arm() {
    this._armed = true;
  }

  _relay(client) {
    const server = net.connect(this._port, this._host);
    for (const socket of [client, server]) {
      this._sockets.add(socket);
      socket.on('error', () => {});
      socket.on('close', () => {
        this._sockets.delete(socket);
        client.destroy();
        server.destroy();
      });
    }
    client.pipe(server);
    // The server's frames one by one, so that the relay can stop at a call's headers.
    let pending = Buffer.alloc(0);
    server.on('data', (chunk) => {
      pending = Buffer.concat([pending, chunk]);
      while (pending.length >= FRAME_HEADER) {
        const size = FRAME_HEADER + pending.readUIntBE(0, 3);
        if (pending.length < size) break;
        const stream = pending.readUInt32BE(5) & 0x7fffffff;
        if (pending[3] === HEADERS_FRAME && stream !== 0 && this._armed) {
          this._armed = false;
          this.cut = true;
          client.destroy();
          server.destroy();
          return;
        }
        client.write(pending.subarray(0, size));
        pending = pending.subarray(size);
      }
    });
  }

  close() {
    this._server.close();
    for (const socket of this._sockets) socket.destroy();
  }
}

/**
 * The sum of the samples of metric `name` whose labels include `labels`, on the
 * /metrics page at `addr` (0 when there are none).
 */
async function scrape(addr, name, labels = {}) {
  const text = await new Promise((resolve, reject) => {
    const request = http.get(`http://${addr}/metrics`, { timeout: WAIT_LIMIT_MS }, (response) => {
      let body = '';
      response.setEncoding('utf8');
      response.on('data', (chunk) => {
        body += chunk;
      });
      response.on('end', () => resolve(body));
    });
    request.on('error', reject);
    request.on('timeout', () => request.destroy(new Error(`no /metrics from ${addr} within ${WAIT_LIMIT_MS / 1000}s`)));
  });
  const wanted = Object.entries(labels).map(([key, value]) => `${key}="${value}"`);
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    const space = line.lastIndexOf(' ');
    if (wanted.every((label) => line.slice(0, space).includes(label))) total += Number(line.slice(space + 1));
  }
  return total;
}

module.exports = { Child, CuttingProxy, scrape, startServer, startSidecar, WAIT_LIMIT_MS, ROOT };
