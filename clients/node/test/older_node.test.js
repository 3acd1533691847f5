'use strict';
// Unit test: client.run() on a node from before Serve. Every real binary of this
// repository serves Serve, so the older node is an in-process grpc-js server with
// Subscribe and Reply only (grpc-js answers the missing Serve with UNIMPLEMENTED).

const { test } = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { Client, loadIpc, toValue, fromValue } = require('../src');
const { WAIT_LIMIT_MS } = require('../src/testing');

const REPLY_TO = 'old#1.0123456789abcdef';

/** Resolves with the next value `push`ed; fails after WAIT_LIMIT_MS. */
function mailbox() {
  const items = [];
  const waiters = [];
  return {
    push(item) {
      if (waiters.length) waiters.shift()(item);
      else items.push(item);
    },
    next(what) {
      if (items.length) return Promise.resolve(items.shift());
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`not within ${WAIT_LIMIT_MS / 1000}s: ${what}`)), WAIT_LIMIT_MS);
        waiters.push((item) => {
          clearTimeout(timer);
          resolve(item);
        });
      });
    },
  };
}

test('on a node without Serve, run() subscribes and answers with Reply calls', async (t) => {
  const subscriptions = mailbox();
  const replies = mailbox();
  const server = new grpc.Server();
  server.addService(loadIpc().Ipc.service, {
    Subscribe(call) {
      subscriptions.push(call.request);
      call.write({ op: 'ipc:subscribed', data: toValue({ id: call.request.id, node: 'old' }) });
      call.write({ op: 'sum', data: toValue([1, 2]), reply_to: REPLY_TO });
      // Open until the client cancels it.
    },
    Reply(call, callback) {
      replies.push(call.request);
      callback(null, {});
    },
  });
  const port = await new Promise((resolve, reject) =>
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) =>
      error ? reject(error) : resolve(bound),
    ),
  );
  t.after(() => server.forceShutdown());

  const worker = new Client(`127.0.0.1:${port}`, { app: 'shop' });
  worker.on('sum', (msg) => msg.data.reduce((a, b) => a + b, 0));
  const running = worker.run({ role: 'calc', id: 'w1', labels: { zone: 'eu' } });
  const outcome = running.then(
    () => null,
    (error) => error,
  );
  try {
    const subscribed = await subscriptions.next('a Subscribe call');
    assert.deepEqual([subscribed.role, subscribed.id, { ...subscribed.labels }], ['calc', 'w1', { zone: 'eu' }]);
    const reply = await replies.next('a Reply call');
    assert.deepEqual([reply.reply_to, reply.op, fromValue(reply.data)], [REPLY_TO, 'sum', 3]);
  } finally {
    worker.stop();
  }
  assert.equal(await outcome, null, 'run() rejected');
  worker.close();
});
