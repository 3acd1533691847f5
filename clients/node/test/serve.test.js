'use strict';
// client.run() answers on its Serve stream, against a real ipc-server (and a real
// ipc-sidecar on a pod socket): each answer reaches its own requester, in whatever
// order the handlers finish, and the node's per-RPC counters show that no Reply call
// carried them.

const { describe, test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Client, ReplyError } = require('../src');
const { scrape, startServer, startSidecar, WAIT_LIMIT_MS } = require('../src/testing');

/** How many `method` calls the node at `metricsAddr` answered (streams: opened). */
function calls(metricsAddr, method, labels = {}) {
  return scrape(metricsAddr, 'ipc_rpc_requests_total', { method, ...labels });
}

/** Resolves when `promise` does; fails naming `what` after WAIT_LIMIT_MS. */
async function within(promise, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`not within ${WAIT_LIMIT_MS / 1000}s: ${what}`)), WAIT_LIMIT_MS);
  });
  try {
    return await Promise.race([promise, late]);
  } finally {
    clearTimeout(timer);
  }
}

/** A client answering sum, blob and fail; `start(options)` runs it, resolving once subscribed. */
function calculator(addr) {
  const calc = new Client(addr, { app: 'shop' });
  calc.on('sum', (msg) => msg.data.reduce((a, b) => a + b, 0));
  calc.on('blob', (msg) => 'x'.repeat(msg.data));
  calc.on('fail', async () => {
    throw new Error('cannot do that');
  });
  let subscribed;
  const ready = new Promise((resolve) => {
    subscribed = resolve;
  });
  calc.on('ipc:subscribed', (msg) => subscribed(msg.data.id));
  calc.start = async (options) => {
    const running = calc.run(options);
    running.catch(() => {});
    calc.stopped = async () => {
      calc.stop();
      await within(running, 'run() resolves after stop()');
      calc.close();
    };
    calc.id = await within(ready, 'the worker subscribed');
    return calc;
  };
  return calc;
}

/** Requests answered with data, with a handler's error, and without a handler. */
async function answersAndErrors(client, target) {
  for (let n = 0; n < 20; n += 1) assert.equal((await client.sendMsg(target, 'sum', [n, 1, 2])).data, n + 3);
  await assert.rejects(client.sendMsg(target, 'fail'), (error) => {
    assert.ok(error instanceof ReplyError);
    assert.equal(error.reply.error, 'cannot do that');
    return true;
  });
  await assert.rejects(client.sendMsg(target, 'unknown:op'), /no handler/);
}

/**
 * `count` requests, each sent once the previous one reached a handler; the handlers
 * finish in reverse, and each requester must get its own answer.
 */
async function outOfOrder(client, worker, target, count = 8) {
  const arrived = [];
  let onArrival = () => {};
  const done = Array.from({ length: count }, () => {
    let set;
    const promise = new Promise((resolve) => {
      set = resolve;
    });
    return { promise, set };
  });
  const finished = [];
  worker.on('square', async (msg) => {
    const n = msg.data;
    arrived.push(n);
    onArrival();
    if (n + 1 < count) await within(done[n + 1].promise, `request ${n + 1} handled while ${n} runs`);
    finished.push(n);
    done[n].set();
    return { n, square: n * n };
  });
  const replies = [];
  for (let n = 0; n < count; n += 1) {
    const reached = new Promise((resolve) => {
      onArrival = resolve;
    });
    replies.push(client.sendMsg(target, 'square', n, { timeoutMs: WAIT_LIMIT_MS }));
    await within(reached, `request ${n} reached a handler`);
    assert.equal(arrived[n], n);
  }
  const answers = await Promise.all(replies);
  assert.deepEqual(
    answers.map((reply) => reply.data),
    Array.from({ length: count }, (_, n) => ({ n, square: n * n })),
  );
  assert.deepEqual(finished, Array.from({ length: count }, (_, n) => count - 1 - n));
}

describe('handlers answer on a Serve stream', () => {
  let server;
  let client;
  let cleanups;

  beforeEach(async () => {
    server = await startServer({ app: 'shop' });
    client = new Client(server.grpcAddr, { app: 'shop' });
    cleanups = [];
  });

  afterEach(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
    client.close();
    const code = await server.stop();
    assert.equal(code, 0, `ipc-server exited with ${code} on SIGTERM:\n${server.describe()}`);
  });

  async function worker(addr, options) {
    const calc = await calculator(addr).start(options);
    let stopped = false;
    const stop = async () => {
      if (!stopped) await calc.stopped();
      stopped = true;
    };
    cleanups.push(stop);
    return { calc, stop };
  }

  test('answers travel on the stream, not as Reply calls', async () => {
    const { stop } = await worker(server.grpcAddr, { role: 'calc' });
    await answersAndErrors(client, ':calc');
    await stop();
    assert.equal(await calls(server.metricsAddr, 'Reply'), 0, 'an answer went as a Reply call');
    assert.equal(await calls(server.metricsAddr, 'Serve', { code: 'OK' }), 1);
    assert.equal(await calls(server.metricsAddr, 'Subscribe'), 0);
  });

  test('concurrent requests answered out of order each reach their requester', async () => {
    const { calc } = await worker(server.grpcAddr, { role: 'calc', concurrency: 8 });
    await outOfOrder(client, calc, ':calc');
    assert.equal(await calls(server.metricsAddr, 'Reply'), 0);
  });

  test('a large answer arrives, and one the node refuses is an error for its requester', async () => {
    await worker(server.grpcAddr, { role: 'calc' });
    assert.equal((await client.sendMsg(':calc', 'blob', 600000)).data.length, 600000);
    // Over the node's --max-msg-bytes (1 MiB): refused on the stream, and the
    // requester is told why at once instead of waiting for its timeout.
    await assert.rejects(client.sendMsg(':calc', 'blob', 2000000, { timeoutMs: WAIT_LIMIT_MS }), (error) => {
      assert.ok(error instanceof ReplyError);
      assert.match(error.reply.error, /answer not delivered.*limit.*--max-msg-bytes/);
      return true;
    });
    // Over what a stream message may be (4 MiB): a Reply call, refused alone.
    await assert.rejects(
      client.sendMsg(':calc', 'blob', 5000000, { timeoutMs: WAIT_LIMIT_MS }),
      /answer not delivered.*too large/,
    );
    assert.equal((await client.sendMsg(':calc', 'sum', [1, 2])).data, 3);
    // Sent on the stream, the 5 MB answer would have ended it: a second Serve call.
    assert.equal(await calls(server.metricsAddr, 'Serve', { code: 'OK' }), 1, 'the stream did not go on');
    assert.equal(await calls(server.metricsAddr, 'Reply', { code: 'OK' }), 0);
  });

  test('a handler that stops run() is answered first', async () => {
    const { calc } = await worker(server.grpcAddr, { role: 'calc' });
    calc.on('restart', () => {
      calc.stop();
      return { restarted: true };
    });
    assert.deepEqual((await client.sendMsg(':calc', 'restart')).data, { restarted: true });
  });

  test('through the sidecar socket, answers travel on Serve streams', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-ipc-node-'));
    const socket = path.join(dir, 'ipc.sock');
    const sidecar = await startSidecar({ socket, upstream: server.grpcAddr, args: ['--role', 'web'] });
    cleanups.push(() => sidecar.kill());
    const { calc, stop } = await worker(socket, { id: 'node-web-1', concurrency: 4 });
    await answersAndErrors(client, 'node-web-1');
    await outOfOrder(client, calc, 'node-web-1', 4);
    await stop();
    // Neither the pod's process nor the sidecar's upstream made a Reply call.
    assert.equal(await calls(sidecar.healthAddr, 'Reply'), 0);
    assert.ok((await calls(sidecar.healthAddr, 'Serve', { code: 'OK' })) >= 1);
    assert.equal(await calls(server.metricsAddr, 'Reply'), 0);
  });
});
