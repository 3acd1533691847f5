#!/usr/bin/env node
'use strict';
// An example worker: subscribes as role `worker`, answers `config:get` and obeys
// `worker:restart`.
//
//   node clients/node/examples/worker.js --addr localhost:7700 --app shop
//
// Then, from another terminal:
//
//   grpcurl -plaintext -d '{"target":":worker","op":"config:get","data":{"key":"db"}}' \
//       -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/SendMsg
//   grpcurl -plaintext -d '{"channel":":worker","op":"worker:restart"}' \
//       -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/Broadcast
//
// It prints one JSON line per event on stdout (subscribed, config:get, restart,
// exit). On worker:restart it exits with status 0, as a worker under a supervisor
// does to be started afresh; SIGTERM and Ctrl-C stop it the same way.

const { parseArgs } = require('node:util');
const { Client } = require('../src');

// What this worker can tell about its configuration.
const CONFIG = {
  db: 'postgres://db.internal:5432/shop',
  cache_ttl_s: 60,
  features: ['search', 'checkout'],
};

function event(name, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event: name, ...fields })}\n`);
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      addr: { type: 'string', default: process.env.IPC_ADDR || 'localhost:7700' },
      app: { type: 'string', default: process.env.IPC_APP || '' },
      tag: { type: 'string', default: '' },
      id: { type: 'string', default: '' },
    },
  });
  const client = new Client(args.addr, { app: args.app || undefined });

  client.on('ipc:subscribed', (msg) => event('subscribed', { id: msg.data.id, node: msg.data.node }));

  client.on('config:get', (msg) => {
    const key = msg.data && typeof msg.data === 'object' ? msg.data.key : msg.data;
    event('config:get', { key, sender: msg.sender });
    // A throw becomes the reply's `error`: the caller sees it, the worker goes on.
    if (!Object.hasOwn(CONFIG, key)) throw new Error(`unknown config key: '${key}'`);
    return { key, value: CONFIG[key] };
  });

  client.on('worker:restart', (msg) => {
    event('restart', { channel: msg.channel, sender: msg.sender, id: msg.id });
    client.stop();
  });

  process.on('SIGTERM', () => client.stop());
  process.on('SIGINT', () => client.stop());

  await client.run({ role: 'worker', tag: args.tag, id: args.id });
  event('exit');
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
