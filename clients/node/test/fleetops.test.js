'use strict';
// gather() and rollout() of the Node client against a real ipc-server, with workers
// running the client's handler API and the example worker as real processes.

const { describe, test, beforeEach, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { Client, FailedPreconditionError, InvalidArgumentError, NoRespondersError } = require('../src');
const { Child, startServer } = require('../src/testing');

const EXAMPLE = path.resolve(__dirname, '../examples/worker.js');

describe('gather and rollout against a real ipc-server', () => {
  let server;
  let client;
  let cleanups;
  let received; // requests the handler workers got, in order

  beforeEach(async () => {
    server = await startServer({ app: 'shop' });
    client = new Client(server.grpcAddr, { app: 'shop' });
    cleanups = [];
    received = [];
  });

  afterEach(async () => {
    for (const cleanup of cleanups.reverse()) await cleanup();
    client.close();
    assert.equal(await server.stop(), 0, server.describe());
  });

  /**
   * Handler workers of role `worker` under the given ids; each answers `check` with
   * its id, with an error when its id starts with `bad`, never when it starts with
   * `mute`. Resolves once all subscribed.
   */
  async function workers(...ids) {
    for (const id of ids) {
      const worker = new Client(server.grpcAddr, { app: 'shop' });
      const subscribed = new Promise((resolve) => worker.on('ipc:subscribed', resolve));
      worker.on('check', (msg) => {
        received.push({ member: id, msg });
        if (id.startsWith('bad')) throw new Error(`${id} is unwell`);
        if (id.startsWith('mute')) return new Promise(() => {}); // never answers
        return { member: id };
      });
      const running = worker.run({ role: 'worker', id });
      cleanups.push(async () => {
        worker.close();
        if (!id.startsWith('mute')) await running;
      });
      await subscribed;
    }
  }

  const statuses = (ledger) => Object.fromEntries(ledger.outcomes.map((o) => [o.member, o.status]));

  async function collect(events) {
    const all = [];
    for await (const event of events) all.push(event);
    return all;
  }

  test('gather names every member with its outcome', async () => {
    await workers('w1', 'bad-w2', 'mute-w3');
    const ledger = await client.gather(':worker', 'check', { deep: true }, { timeoutMs: 1000, headers: { trace: 't-1' } });
    assert.deepEqual([ledger.state, ledger.target, ledger.op, ledger.expected], ['DONE', 'shop:worker', 'check', 3]);
    assert.deepEqual([ledger.ok, ledger.failed, ledger.no_reply], [1, 1, 1]);
    assert.deepEqual(statuses(ledger), { 'bad-w2': 'FAILED', 'mute-w3': 'NO_REPLY', w1: 'OK' });
    const [bad, mute, good] = ledger.outcomes;
    assert.deepEqual(good.reply.data, { member: 'w1' });
    assert.equal(bad.detail, 'replied with error: bad-w2 is unwell');
    assert.equal(mute.detail, 'no answer within 1000 ms');
    assert.equal(mute.reply, null);
    for (const { msg } of received) {
      assert.deepEqual([msg.data, msg.headers.trace, msg.headers['ipc-op-id']], [{ deep: true }, 't-1', ledger.id]);
    }
  });

  test('a keyed gather asks once; a dry run asks nobody', async () => {
    await workers('w1', 'w2');
    const plan = await client.gather(':worker', 'check', undefined, { dryRun: true, labels: {} });
    assert.deepEqual([plan.state, plan.outcomes.map((o) => o.status)], ['DRY_RUN', ['PENDING', 'PENDING']]);
    const first = await client.gather(':worker', 'check', undefined, { key: 'audit-1' });
    const again = await client.gather(':worker', 'check', undefined, { key: 'audit-1' });
    assert.deepEqual(again, first);
    assert.equal(received.length, 2);
    assert.ok(received.every(({ msg }) => msg.headers['ipc-op-key'] === 'audit-1'));
    await assert.rejects(collect(client.rollout(':worker', 'check', undefined, { key: 'audit-1' })), FailedPreconditionError);
  });

  test('rollout yields each outcome in its wave, then the ledger', async () => {
    await workers('w1', 'w2', 'w3');
    const plan = await collect(client.rollout(':worker', 'check', undefined, { waveSize: 2, dryRun: true }));
    assert.deepEqual(plan.map((e) => e.ledger.outcomes.map((o) => o.wave)), [[1, 1, 2]]);
    assert.equal(received.length, 0);

    const events = await collect(client.rollout(':worker', 'check', undefined, { waveSize: 2 }));
    const progress = events.slice(0, -1).map((e) => [e.wave, e.outcome.member, e.outcome.status]);
    assert.deepEqual(progress.sort(), [
      [1, 'w1', 'OK'],
      [1, 'w2', 'OK'],
      [2, 'w3', 'OK'],
    ]);
    const { ledger, outcome } = events.at(-1);
    assert.equal(outcome, null);
    assert.deepEqual([ledger.state, ledger.ok, ledger.waves], ['DONE', 3, 2]);
    // Wave 2 was asked only after wave 1 answered.
    const asked = received.map(({ member, msg }) => [member, msg.headers['ipc-op-wave']]);
    assert.deepEqual(asked.at(-1), ['w3', '2']);
    assert.deepEqual(asked.sort(), [
      ['w1', '1'],
      ['w2', '1'],
      ['w3', '2'],
    ]);
  });

  test('past the failure budget the rollout stops and the rest stay unasked', async () => {
    await workers('bad-w1', 'w2', 'w3');
    const events = await collect(client.rollout(':worker', 'check', undefined, { maxFailures: 0, key: 'deploy-1' }));
    const { ledger } = events.at(-1);
    assert.equal(ledger.state, 'STOPPED');
    assert.deepEqual(statuses(ledger), { 'bad-w1': 'FAILED', w2: 'PENDING', w3: 'PENDING' });
    assert.deepEqual(received.map(({ member }) => member), ['bad-w1']);

    // A rerun with the key and a larger budget resumes the same ledger.
    const resumed = (await collect(client.rollout(':worker', 'check', undefined, { maxFailures: 1, key: 'deploy-1' }))).at(-1).ledger;
    assert.deepEqual([resumed.id, resumed.state], [ledger.id, 'DONE']);
    assert.deepEqual(statuses(resumed), { 'bad-w1': 'FAILED', w2: 'OK', w3: 'OK' });
  });

  test('errors reject with their classes', async () => {
    await assert.rejects(client.gather(':worker', 'check'), NoRespondersError);
    await assert.rejects(collect(client.rollout(':worker', 'check')), NoRespondersError);
    await assert.rejects(client.gather('', 'check'), InvalidArgumentError);
  });

  test('the example workers restart in waves and each comes back under its id', async () => {
    const started = [];
    for (const id of ['worker-1', 'worker-2', 'worker-3']) {
      const worker = new Child(process.execPath, [EXAMPLE, '--addr', server.grpcAddr, '--app', 'shop', '--id', id]);
      cleanups.push(() => worker.kill());
      await worker.waitFor(/"event":"subscribed"/);
      started.push(worker);
    }
    const events = await collect(
      client.rollout(':worker', 'worker:restart', undefined, { waveSize: 2, readyTimeoutMs: 10000, deadlineMs: 30000 }),
    );
    const { ledger } = events.at(-1);
    assert.deepEqual([ledger.state, ledger.ok, ledger.waves], ['DONE', 3, 2]);
    assert.deepEqual(
      ledger.outcomes.map((o) => [o.member, o.wave, o.reply.data]),
      [
        ['worker-1', 1, { restarted: true }],
        ['worker-2', 1, { restarted: true }],
        ['worker-3', 2, { restarted: true }],
      ],
    );
    for (const [n, worker] of started.entries()) {
      const restart = JSON.parse(await worker.waitFor(/"event":"restart"/));
      assert.equal(restart.operation, ledger.id);
      const again = JSON.parse(await worker.waitFor(/"event":"subscribed"/));
      assert.equal(again.id, `worker-${n + 1}`);
    }
  });
});
