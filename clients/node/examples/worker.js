#!/usr/bin/env node
'use strict';
// An example worker: subscribes as role `worker`, answers `config:get` and restarts
// on `worker:restart`.
//
//   node clients/node/examples/worker.js --addr localhost:7700 --app shop --id worker-1
//
// Then, from another terminal:
//
//   grpcurl -plaintext -d '{"target":":worker","op":"config:get","data":{"key":"db"}}' \
//       -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/SendMsg
//   grpcurl -plaintext -d '{"target":":worker","op":"worker:restart","wave_size":2,"max_failures":0,"ready_timeout_ms":30000}' \
//       -H 'ipc-app: shop' localhost:7700 ipc.v1.Ipc/Rollout
//
// It prints one JSON line per event on stdout (subscribed, config:get, restart,
// exit). On worker:restart — a Rollout's request or a broadcast — it answers, ends its
// subscription and subscribes again under the same id, as a process restarted by its
// supervisor does with a stable id such as the pod name: a Rollout with
// ready_timeout_ms waits for exactly that before its next wave. The request's
// ipc-op-id header names the operation, so a repeat of one already done (a rerun
// after its coordinator died) is answered without restarting again. SIGTERM and
// Ctrl-C stop it.

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
      id: { type: 'string', default: process.env.IPC_ID || '' }, // stable id, e.g. the pod name
    },
  });
  const client = new Client(args.addr, { app: args.app || undefined });
  let restarting = false;
  let terminated = false;
  const doneOperations = new Set(); // ipc-op-id of the restarts already done

  client.on('ipc:subscribed', (msg) => event('subscribed', { id: msg.data.id, node: msg.data.node }));

  client.on('config:get', (msg) => {
    const key = msg.data && typeof msg.data === 'object' ? msg.data.key : msg.data;
    event('config:get', { key, sender: msg.sender });
    // A throw becomes the reply's `error`: the caller sees it, the worker goes on.
    if (!Object.hasOwn(CONFIG, key)) throw new Error(`unknown config key: '${key}'`);
    return { key, value: CONFIG[key] };
  });

  client.on('worker:restart', (msg) => {
    const operation = msg.headers['ipc-op-id'] || '';
    const repeat = Boolean(operation) && doneOperations.has(operation);
    event('restart', { channel: msg.channel, sender: msg.sender, id: msg.id, operation, repeat });
    if (repeat) return { restarted: false, reason: 'already restarted for this operation' };
    doneOperations.add(operation);
    // The answer goes out first; run() then resolves and the loop below subscribes
    // again under the same id.
    restarting = true;
    client.stop();
    return { restarted: true };
  });

  const terminate = () => {
    terminated = true;
    client.stop();
  };
  process.on('SIGTERM', terminate);
  process.on('SIGINT', terminate);

  let id = args.id;
  while (!terminated) {
    await client.run({ role: 'worker', tag: args.tag, id });
    if (!restarting) break;
    // A real worker would reload code or configuration here.
    restarting = false;
    id = client.id || id;
  }
  event('exit');
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
