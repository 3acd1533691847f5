'use strict';
// A broadcast whose answer is lost on a real connection: the client retries it under
// the key of its first attempt, and the message is delivered once.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { Client, UnavailableError } = require('../src');
const { CuttingProxy, startServer } = require('../src/testing');

async function setUp(t) {
  const server = await startServer({ app: 'shop' });
  const proxy = await CuttingProxy.start(server.grpcAddr);
  const direct = new Client(server.grpcAddr, { app: 'shop' });
  const through = new Client(proxy.addr, { app: 'shop' });
  const subscription = direct.subscribe({ channels: [':deploys'] });
  const messages = subscription[Symbol.asyncIterator]();
  t.after(async () => {
    subscription.cancel();
    through.close();
    direct.close();
    proxy.close();
    assert.equal(await server.stop(), 0, server.describe());
  });
  assert.equal((await messages.next()).value.op, 'ipc:subscribed');
  await through.members(); // connected: the next answer through the proxy is the broadcast's
  proxy.arm();
  return { proxy, direct, through, messages };
}

test('a lost answer is retried under its key and delivered once', async (t) => {
  const { proxy, direct, through, messages } = await setUp(t);
  const sent = await through.broadcast(':deploys', 'deploy:start', { version: 42 });
  assert.ok(proxy.cut, 'the first answer was not lost');
  // The first attempt was stored; the retry, under the same key, was not.
  assert.equal(sent.duplicate, true);
  const delivered = (await messages.next()).value;
  assert.deepEqual([delivered.id, delivered.data], [sent.id, { version: 42 }]);
  const marker = await direct.broadcast(':deploys', 'marker');
  assert.equal((await messages.next()).value.id, marker.id, 'the retry was delivered a second time');
});

test('without retry the lost answer is an error though the message was stored', async (t) => {
  const { through, messages } = await setUp(t);
  await assert.rejects(through.broadcast(':deploys', 'deploy:start', undefined, { retry: false }), UnavailableError);
  // Why the clients key their retries: the unanswered broadcast was delivered.
  assert.equal((await messages.next()).value.op, 'deploy:start');
});
