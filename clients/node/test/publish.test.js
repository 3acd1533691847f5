'use strict';
// Bulk publishing (client.publish) and idempotency keys (broadcast's `key`) against a
// real ipc-server.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { Client, InvalidArgumentError } = require('../src');
const { startServer } = require('../src/testing');

async function nextOf(iterator) {
  const { value, done } = await iterator.next();
  assert.ok(!done, 'the stream ended');
  return value;
}

test('publish answers each message in order and a key is stored once', async () => {
  const server = await startServer({ app: 'shop' });
  const client = new Client(server.grpcAddr, { app: 'shop' });
  try {
    const stream = client.subscribe({ channels: [':jobs'] })[Symbol.asyncIterator]();
    assert.equal((await nextOf(stream)).op, 'ipc:subscribed');

    const messages = [0, 1, 2, 3].map((n) => ({ channel: ':jobs', op: n === 2 ? '' : 'tick', data: n }));
    const answers = [];
    for await (const answer of client.publish(messages)) answers.push(answer);
    assert.equal(answers.length, 4);
    assert.ok(answers[2] instanceof InvalidArgumentError, String(answers[2]));
    for (const n of [0, 1, 3]) {
      assert.ok(answers[n].cursor);
      const msg = await nextOf(stream);
      assert.deepEqual([msg.id, msg.data], [answers[n].id, n]);
    }

    const first = await client.broadcast(':jobs', 'job:run', 1, { key: 'nightly-1' });
    const again = await client.broadcast(':jobs', 'job:run', 2, { key: 'nightly-1' });
    assert.ok(!first.duplicate && again.duplicate);
    assert.deepEqual([again.id, again.cursor], [first.id, first.cursor]);
    const other = await client.broadcast(':jobs', 'marker');
    assert.ok(!other.duplicate);
    assert.equal((await nextOf(stream)).op, 'job:run');
    assert.equal((await nextOf(stream)).op, 'marker');
    await stream.return();
  } finally {
    client.close();
    await server.stop();
  }
});
