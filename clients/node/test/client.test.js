'use strict';
// The Node client against a real ipc-server: the verbs, the handler API, each failure
// as an Error with its gRPC code, and the example worker run as a real process.

const { describe, test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { status } = require('@grpc/grpc-js');
const {
  Client,
  DeadlineExceededError,
  InvalidArgumentError,
  NoRespondersError,
  NotFoundError,
  ReplyError,
  UnavailableError,
} = require('../src');
const { Child, startServer, WAIT_LIMIT_MS } = require('../src/testing');

test('emit calls a handler in-process', async () => {
  const local = new Client('localhost:1'); // never connects
  local.on('add', (msg) => msg.data.a + msg.data.b);
  assert.equal(await local.emit('add', { op: 'add', data: { a: 2, b: 3 } }), 5);
  await assert.rejects(local.emit('missing'), /no handler/);
  local.close();
});

describe('against a real ipc-server', () => {
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

  /** Reads a subscription into a queue so a test can take messages with a bound. */
  function inbox(options) {
    const subscription = client.subscribe(options);
    const queue = [];
    let wake = () => {};
    let failure = null;
    (async () => {
      try {
        for await (const msg of subscription) {
          queue.push(msg);
          wake();
        }
      } catch (error) {
        failure = error;
        wake();
      }
    })();
    cleanups.push(() => subscription.cancel());
    const next = () =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no message within ${WAIT_LIMIT_MS / 1000}s`)), WAIT_LIMIT_MS);
        const check = () => {
          if (queue.length || failure) {
            clearTimeout(timer);
            wake = () => {};
            if (queue.length) resolve(queue.shift());
            else reject(failure);
          } else {
            wake = check;
          }
        };
        check();
      });
    return { subscription, next };
  }

  async function subscribed(options) {
    const box = inbox(options);
    assert.equal((await box.next()).op, 'ipc:subscribed');
    return box;
  }

  /** A second client running handlers as role `calc`; resolves once subscribed. */
  async function calcWorker() {
    const calc = new Client(server.grpcAddr, { app: 'shop' });
    let ready;
    const isReady = new Promise((resolve) => {
      ready = resolve;
    });
    calc.on('ipc:subscribed', () => ready());
    calc.on('sum', (msg) => msg.data.reduce((a, b) => a + b, 0));
    calc.on('slow:sum', async (msg) => {
      await Promise.resolve();
      return msg.data.reduce((a, b) => a + b, 0);
    });
    calc.on('fail', () => {
      throw new Error('cannot do that');
    });
    const running = calc.run({ role: 'calc' });
    cleanups.push(async () => {
      calc.stop();
      await running;
      calc.close();
    });
    await isReady;
    return calc;
  }

  test('broadcast is received with its id, channel and cursor', async () => {
    const news = await subscribed({ channels: [':news'] });
    assert.ok(news.subscription.id);
    const sent = await client.broadcast(':news', 'news:out', { n: 1, tags: ['a'], none: null }, { headers: { trace: 't' } });
    assert.equal(sent.channel, 'shop:news');
    const got = await news.next();
    assert.equal(got.op, 'news:out');
    assert.deepEqual(got.data, { n: 1, tags: ['a'], none: null });
    assert.deepEqual(got.headers, { trace: 't' });
    assert.deepEqual([got.id, got.channel, got.cursor], [sent.id, sent.channel, sent.cursor]);
    assert.ok(got.ts_ms > 0);
  });

  test('role/tag channels and patterns', async () => {
    const workers = await subscribed({ role: 'worker', tag: 'blue' });
    const everything = await subscribed({ channels: ['shop:>'] });
    await client.broadcast(':worker:blue', 'to:blue', 'text');
    const got = await workers.next();
    assert.deepEqual([got.op, got.data], ['to:blue', 'text']);
    assert.equal((await everything.next()).channel, 'shop:worker:blue');
  });

  test('resume from the last cursor gets exactly the missed messages', async () => {
    const first = await subscribed({ channels: [':orders'], id: 'reader' });
    await client.broadcast(':orders', 'order:0');
    await first.next();
    const { cursor } = first.subscription;
    first.subscription.cancel();
    await client.broadcast(':orders', 'order:1');
    await client.broadcast(':orders', 'order:2');
    const resumed = await subscribed({ channels: [':orders'], id: 'reader', cursor });
    assert.deepEqual([(await resumed.next()).op, (await resumed.next()).op], ['order:1', 'order:2']);
  });

  test('a handler result answers the request', async () => {
    await calcWorker();
    const reply = await client.sendMsg(':calc', 'sum', [1, 2, 3]);
    assert.equal(reply.op, 'sum');
    assert.equal(reply.data, 6);
    assert.equal((await client.sendMsg(':calc', 'slow:sum', [4, 5])).data, 9);
  });

  test('a handler throw becomes a ReplyError', async () => {
    await calcWorker();
    await assert.rejects(client.sendMsg(':calc', 'fail'), (error) => {
      assert.ok(error instanceof ReplyError);
      assert.equal(error.reply.error, 'cannot do that');
      return true;
    });
    const reply = await client.sendMsg(':calc', 'fail', undefined, { raiseOnError: false });
    assert.equal(reply.error, 'cannot do that');
    await assert.rejects(client.sendMsg(':calc', 'unknown:op'), /no handler/);
  });

  test('no responders is a NoRespondersError with code UNAVAILABLE', async () => {
    await assert.rejects(client.sendMsg(':nobody', 'x', undefined, { timeoutMs: 60000 }), (error) => {
      assert.ok(error instanceof NoRespondersError);
      assert.equal(error.code, status.UNAVAILABLE);
      assert.match(error.message, /no responders/);
      return true;
    });
  });

  test('no answer in time is a DeadlineExceededError', async () => {
    const silent = await subscribed({ role: 'silent' });
    await assert.rejects(client.sendMsg(':silent', 'x', undefined, { timeoutMs: 300 }), (error) => {
      assert.ok(error instanceof DeadlineExceededError);
      assert.equal(error.code, status.DEADLINE_EXCEEDED);
      return true;
    });
    const request = await silent.next();
    // Too late now.
    await assert.rejects(client.reply(request.reply_to, { op: 'x' }), (error) => {
      assert.ok(error instanceof NotFoundError);
      assert.equal(error.code, status.NOT_FOUND);
      return true;
    });
  });

  test('bad input is an InvalidArgumentError saying what is wrong', async () => {
    await assert.rejects(client.broadcast('shop:*', 'x'), (error) => {
      assert.ok(error instanceof InvalidArgumentError);
      assert.equal(error.code, status.INVALID_ARGUMENT);
      assert.match(error.message, /pattern/);
      return true;
    });
    await assert.rejects(client.broadcast(':news', ''), InvalidArgumentError);
  });

  test('ping the node and list members', async () => {
    assert.equal((await client.sendMsg('', 'ping')).op, 'pong');
    const calc = await calcWorker();
    const [member, ...others] = await client.members({ role: 'calc' });
    assert.deepEqual(others, []);
    assert.equal(member.id, calc.id);
    assert.deepEqual([member.app, member.role], ['shop', 'calc']);
    assert.ok(member.channels.includes('shop:calc'));
  });

  test('members a broadcast would reach', async () => {
    const calc = await calcWorker();
    assert.deepEqual((await client.members({ channel: ':calc' })).map((m) => m.id), [calc.id]);
    assert.deepEqual(await client.members({ channel: ':nobody' }), []);
  });

  test('run() without reconnect rejects with UnavailableError when the server stops', async () => {
    const calc = new Client(server.grpcAddr, { app: 'shop' });
    let ready;
    const isReady = new Promise((resolve) => {
      ready = resolve;
    });
    calc.on('ipc:subscribed', () => ready());
    // Settled into a value at once, so the rejection is never unhandled.
    const outcome = calc.run({ role: 'calc', reconnect: false }).then(
      () => null,
      (error) => error,
    );
    await isReady;
    assert.equal(await server.stop(), 0);
    assert.ok((await outcome) instanceof UnavailableError);
    calc.close();
  });

  test('run() reconnects under the same id when the server comes back', async () => {
    const calc = new Client(server.grpcAddr, { app: 'shop' });
    const events = [];
    let notify = () => {};
    const next = (op) =>
      new Promise((resolve) => {
        const check = () => {
          const index = events.findIndex((msg) => msg.op === op);
          if (index < 0) return;
          notify = () => {};
          resolve(events.splice(index, 1)[0]);
        };
        notify = check;
        check();
      });
    for (const op of ['ipc:subscribed', 'ipc:gap', 'news']) {
      calc.on(op, (msg) => {
        events.push(msg);
        notify();
      });
    }
    calc.on('sum', (msg) => msg.data.reduce((a, b) => a + b, 0));
    const running = calc.run({ role: 'calc' });
    const first = await next('ipc:subscribed');
    await client.broadcast(':calc', 'news');
    await next('news'); // the worker now holds a cursor of the old log

    // Same address, new process: its memory log does not know the old cursor.
    assert.equal(await server.stop(), 0);
    server = await startServer({ app: 'shop', listen: server.grpcAddr });
    const again = await next('ipc:subscribed');
    assert.equal(again.data.id, first.data.id);
    const caller = new Client(server.grpcAddr, { app: 'shop' });
    assert.equal((await caller.sendMsg(':calc', 'sum', [2, 3])).data, 5);
    // The loss is reported, not hidden.
    assert.equal((await next('ipc:gap')).op, 'ipc:gap');
    caller.close();
    calc.stop();
    await running;
    calc.close();
  });

  // --- the example worker as a real process ---------------------------------------

  const EXAMPLE = path.resolve(__dirname, '../examples/worker.js');

  async function exampleWorker(...args) {
    const worker = new Child(process.execPath, [EXAMPLE, '--addr', server.grpcAddr, '--app', 'shop', ...args]);
    cleanups.push(() => worker.kill());
    const subscribedEvent = await nextEvent(worker, 'subscribed');
    return { worker, subscribedEvent };
  }

  async function nextEvent(worker, name) {
    return JSON.parse(await worker.waitFor((line) => JSON.parse(line).event === name, `{"event":"${name}"}`));
  }

  test('example worker answers config:get', async () => {
    const { worker } = await exampleWorker('--tag', 'blue');
    const reply = await client.sendMsg(':worker', 'config:get', { key: 'db' });
    assert.deepEqual(reply.data, { key: 'db', value: 'postgres://db.internal:5432/shop' });
    assert.equal((await nextEvent(worker, 'config:get')).key, 'db');
    await assert.rejects(client.sendMsg(':worker', 'config:get', { key: 'nope' }), /unknown config key/);
  });

  test('example worker subscribes again under its id on worker:restart', async () => {
    const { worker, subscribedEvent } = await exampleWorker('--tag', 'blue');
    const sent = await client.broadcast(':worker:blue', 'worker:restart');
    const restart = await nextEvent(worker, 'restart');
    assert.deepEqual([restart.id, restart.channel], [sent.id, 'shop:worker:blue']);
    const again = await nextEvent(worker, 'subscribed');
    assert.equal(again.id, subscribedEvent.id, 'the id the node assigned first is kept');
    const [member] = await client.members({ role: 'worker' });
    assert.deepEqual([member.id, member.tag], [subscribedEvent.id, 'blue']);
    assert.equal((await client.sendMsg(subscribedEvent.id, 'config:get', { key: 'db' })).data.key, 'db');
  });

  test('example worker answers a repeated operation without restarting again', async () => {
    const { worker, subscribedEvent } = await exampleWorker();
    const headers = { 'ipc-op-id': 'op-1', 'ipc-op-key': 'restart-1' };
    const first = await client.sendMsg(subscribedEvent.id, 'worker:restart', undefined, { headers });
    assert.deepEqual(first.data, { restarted: true });
    assert.equal((await nextEvent(worker, 'subscribed')).id, subscribedEvent.id);
    const repeat = await client.sendMsg(subscribedEvent.id, 'worker:restart', undefined, { headers });
    assert.deepEqual(repeat.data, { restarted: false, reason: 'already restarted for this operation' });
    assert.equal((await nextEvent(worker, 'restart')).repeat, true);
  });

  test('example worker stops on SIGTERM', async () => {
    const { worker } = await exampleWorker();
    assert.equal(await worker.stop(), 0, worker.describe());
    await nextEvent(worker, 'exit');
  });
});
