'use strict';
// The Node client on a pod's Unix socket, through a real ipc-sidecar relaying to a
// real ipc-server: what an application in a Kubernetes pod does.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Client, NoRespondersError } = require('../src');
const { startServer, startSidecar } = require('../src/testing');

test('a pod process pings, broadcasts and receives over the socket', async (t) => {
  const server = await startServer({ app: 'shop' });
  t.after(() => server.kill());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-ipc-node-'));
  const socket = path.join(dir, 'ipc.sock');
  const sidecar = await startSidecar({ socket, upstream: server.grpcAddr, args: ['--role', 'web'] });
  t.after(() => sidecar.kill());

  const local = new Client(socket, { app: 'shop' });
  const operator = new Client(server.grpcAddr, { app: 'shop' });
  t.after(() => {
    local.close();
    operator.close();
  });

  assert.equal((await local.sendMsg('', 'ping')).op, 'pong');
  const subscription = local.subscribe({ channels: [':news'] });
  const messages = subscription[Symbol.asyncIterator]();
  assert.equal((await messages.next()).value.op, 'ipc:subscribed');
  const sent = await operator.broadcast(':news', 'news:out', { n: 1 });
  const got = (await messages.next()).value;
  assert.deepEqual([got.op, got.channel, got.cursor], ['news:out', 'shop:news', sent.cursor]);
  subscription.cancel();

  await assert.rejects(local.sendMsg(':nobody', 'x', null, { timeoutMs: 2000 }), NoRespondersError);
});
