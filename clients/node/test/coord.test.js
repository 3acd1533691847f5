'use strict';
// Locks and rate limits through the Node client against a real ipc-server.

const { describe, test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const { Client, InvalidArgumentError } = require('../src');
const { startServer } = require('../src/testing');

describe('locks and limits against a real ipc-server', () => {
  let server;
  let client;

  beforeEach(async () => {
    server = await startServer({ app: 'shop' });
    client = new Client(server.grpcAddr, { app: 'shop' });
  });

  afterEach(async () => {
    client.close();
    const code = await server.stop();
    assert.equal(code, 0, `ipc-server exited with ${code} on SIGTERM:\n${server.describe()}`);
  });

  test('one holder, renewal, release, growing fences', async () => {
    const lease = await client.lock(':job', { ttlMs: 30000 });
    assert.ok(lease.acquired && lease.fence > 0, JSON.stringify(lease));

    const refused = await client.lock(':job', { ttlMs: 30000 });
    assert.equal(refused.acquired, false);
    assert.equal(refused.fence, 0);
    assert.equal(refused.holder, lease.holder);

    const renewed = await client.renew(':job', lease.fence, { ttlMs: 60000 });
    assert.ok(renewed.acquired && renewed.fence === lease.fence);
    assert.ok(renewed.expires_ms > lease.expires_ms);

    assert.equal(await client.unlock(':job', lease.fence + 1), false);
    assert.equal(await client.unlock(':job', lease.fence), true);
    assert.equal(await client.unlock(':job', lease.fence), false);

    const again = await client.lock(':job', { ttlMs: 30000 });
    assert.ok(again.acquired && again.fence > lease.fence);
  });

  test('a waiter gets the lock once it is released', async () => {
    const lease = await client.lock(':job', { ttlMs: 30000 });
    const other = new Client(server.grpcAddr, { app: 'shop' });
    try {
      const waiting = other.lock(':job', { ttlMs: 30000, waitMs: 20000 });
      // Whether or not the waiter already waits, it must get the lock after this.
      assert.equal(await client.unlock(':job', lease.fence), true);
      const got = await waiting;
      assert.ok(got.acquired && got.fence > lease.fence, JSON.stringify(got));
    } finally {
      other.close();
    }
  });

  test('a zero ttl is INVALID_ARGUMENT', async () => {
    await assert.rejects(client.lock(':job', { ttlMs: 0 }), (error) => error instanceof InvalidArgumentError && /ttl/.test(error.message));
  });

  test('limit allows the burst, then refuses', async () => {
    const answers = [];
    for (let i = 0; i < 3; i += 1) answers.push(await client.limit(':mail', { rate: 1, intervalMs: 3600000, burst: 2 }));
    assert.deepEqual(answers.map((a) => a.allowed), [true, true, false]);
    assert.deepEqual(answers.slice(0, 2).map((a) => a.remaining), [1, 0]);
    assert.ok(answers[2].retry_after_ms > 0);
  });
});
