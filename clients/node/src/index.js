'use strict';
// fleet-ipc's Node.js client: a thin promise-based wrapper over ipc.v1, loaded at run
// time from proto/ipc/v1/ipc.proto with @grpc/proto-loader (no generated code).
//
//   const { Client } = require('fleet-ipc');
//   const client = new Client('localhost:7700', { app: 'shop' });
//   await client.broadcast(':worker', 'worker:restart');
//   const reply = await client.sendMsg(':worker', 'config:get', { key: 'db' }, { timeoutMs: 2000 });
//   const ledger = await client.gather(':worker', 'health:check');        // every worker, each named
//   for await (const event of client.rollout(':worker', 'worker:restart', null, { waveSize: 2 })) { ... }
//
// Data is plain JSON values (google.protobuf.Value is converted both ways); failures
// are Errors with the gRPC `code` (see ./errors.js). On top of subscribe sits a
// handler API like backendjs's ipc.on(op, fn): `client.on(op, fn)` then
// `client.run({ role })`, which answers requests with the handler's result and
// reconnects, resuming from its cursor, when the stream is cut.

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const crypto = require('node:crypto');
const errors = require('./errors');

const DEFAULT_ADDR = 'localhost:7700';
const DEFAULT_SEND_TIMEOUT_MS = 5000; // SendMsg's wait when none is given (the server's too)
const DEFAULT_CALL_TIMEOUT_MS = 10000; // bound on other unary calls
// Slack on SendMsg's gRPC deadline over timeout_ms, so that the server's own
// DEADLINE_EXCEEDED (with its explanation) arrives before the client gives up.
const DEADLINE_SLACK_MS = 1000;
// Attempts of a broadcast that keeps failing with UNAVAILABLE.
const BROADCAST_ATTEMPTS = 3;
const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 5000;

const SUBSCRIBED_OP = 'ipc:subscribed';
const GAP_OP = 'ipc:gap';

/** The directory holding ipc/v1/ipc.proto: $IPC_PROTO_ROOT, else the checkout's proto/. */
function findProtoRoot() {
  const candidates = [process.env.IPC_PROTO_ROOT, path.resolve(__dirname, '../../../proto')];
  for (const root of candidates) {
    if (root && fs.existsSync(path.join(root, 'ipc/v1/ipc.proto'))) return root;
  }
  throw new Error('cannot find ipc/v1/ipc.proto: set IPC_PROTO_ROOT to the directory that holds it');
}

const loaded = new Map();
/** The ipc.v1 package, loaded once per proto root. */
function loadIpc(protoRoot = findProtoRoot()) {
  if (!loaded.has(protoRoot)) {
    const definition = protoLoader.loadSync('ipc/v1/ipc.proto', {
      includeDirs: [protoRoot],
      keepCase: true, // field names as in the proto: reply_to, timeout_ms
      longs: Number, // int64 fields are milliseconds: safe as numbers
      enums: String,
      defaults: true,
      oneofs: true, // Value's `kind` names the set field
    });
    loaded.set(protoRoot, grpc.loadPackageDefinition(definition).ipc.v1);
  }
  return loaded.get(protoRoot);
}

/** A JSON value as google.protobuf.Value (undefined: absent). */
function toValue(data) {
  if (data === undefined) return undefined;
  if (data === null) return { nullValue: 'NULL_VALUE' };
  if (typeof data.toJSON === 'function') return toValue(data.toJSON());
  switch (typeof data) {
    case 'number':
      return { numberValue: data };
    case 'string':
      return { stringValue: data };
    case 'boolean':
      return { boolValue: data };
    case 'object':
      if (Array.isArray(data)) return { listValue: { values: data.map((item) => toValue(item) ?? toValue(null)) } };
      return {
        structValue: {
          fields: Object.fromEntries(
            Object.entries(data)
              .filter(([, item]) => item !== undefined)
              .map(([key, item]) => [key, toValue(item)]),
          ),
        },
      };
    default:
      throw new TypeError(`cannot send a ${typeof data} as JSON data`);
  }
}

/** google.protobuf.Value as a JSON value (absent: undefined). */
function fromValue(value) {
  if (!value || !value.kind) return undefined;
  switch (value.kind) {
    case 'nullValue':
      return null;
    case 'structValue':
      return Object.fromEntries(
        Object.entries(value.structValue.fields || {}).map(([key, item]) => [key, fromValue(item)]),
      );
    case 'listValue':
      return (value.listValue.values || []).map(fromValue);
    default:
      return value[value.kind];
  }
}

/** An ipc.v1.Msg with `data` as a plain value. */
function broadcasted(response) {
  return { id: response.id, channel: response.channel, cursor: response.cursor, duplicate: Boolean(response.duplicate) };
}

function toMsg(pb) {
  return {
    op: pb.op,
    data: fromValue(pb.data),
    headers: { ...pb.headers },
    id: pb.id,
    channel: pb.channel,
    sender: pb.sender,
    ts_ms: Number(pb.ts_ms),
    cursor: pb.cursor,
    reply_to: pb.reply_to,
    error: pb.error,
  };
}

/** The fields GatherRequest and RolloutRequest share. */
function operationRequest(target, op, data, { headers, labels, dryRun, key, timeoutMs }) {
  return {
    target,
    op,
    data: toValue(data),
    headers,
    labels,
    dry_run: dryRun,
    key,
    timeout_ms: Math.max(1, Math.round(timeoutMs)),
  };
}

/** An ipc.v1.Outcome: status by name ('OK', 'FAILED', ...), reply as a message or null. */
function toOutcome(pb) {
  return {
    member: pb.member,
    node: pb.node,
    status: pb.status,
    reply: pb.reply ? toMsg(pb.reply) : null,
    wave: pb.wave,
    duration_ms: Number(pb.duration_ms),
    detail: pb.detail,
  };
}

/** An ipc.v1.Ledger: state by name ('DONE', 'STOPPED', ...), one outcome per member. */
function toLedger(pb) {
  return {
    id: pb.id,
    target: pb.target,
    op: pb.op,
    state: pb.state,
    expected: pb.expected,
    ok: pb.ok,
    failed: pb.failed,
    no_reply: pb.no_reply,
    not_ready: pb.not_ready,
    skipped: pb.skipped,
    outcomes: (pb.outcomes || []).map(toOutcome),
    waves: pb.waves,
  };
}

/** An ipc.v1.RolloutEvent: `outcome` or (last) `ledger`, the other null. */
function toRolloutEvent(pb) {
  return { wave: pb.wave, outcome: pb.outcome ? toOutcome(pb.outcome) : null, ledger: pb.ledger ? toLedger(pb.ledger) : null };
}

/** gRPC target for host:port, http://host:port or a Unix socket path. */
function grpcTarget(addr) {
  const stripped = addr.replace(/^(https?|grpc):\/\//, '').replace(/\/$/, '');
  return stripped.startsWith('/') ? `unix:${stripped}` : stripped;
}

/**
 * An open Subscribe stream: `for await (const msg of subscription)`. The first
 * message is `ipc:subscribed`; after it `id` and `node` say who and where this
 * subscriber is. `cursor` is the last one seen, to resume with. `cancel()` ends the
 * iteration quietly.
 */
class Subscription {
  constructor(call) {
    this._call = call;
    this._cancelled = false;
    this.id = '';
    this.node = '';
    this.cursor = '';
  }

  async *[Symbol.asyncIterator]() {
    try {
      for await (const pb of this._call) {
        const msg = toMsg(pb);
        if (msg.op === SUBSCRIBED_OP && msg.data) {
          this.id = String(msg.data.id || '');
          this.node = String(msg.data.node || '');
        }
        if (msg.cursor) this.cursor = msg.cursor;
        yield msg;
      }
    } catch (error) {
      if (this._cancelled && error.code === grpc.status.CANCELLED) return;
      throw errors.fromGrpcError(error);
    } finally {
      // A consumer that stops iterating (break) ends the stream.
      this.cancel();
    }
  }

  cancel() {
    if (this._cancelled) return;
    this._cancelled = true;
    this._call.cancel();
  }
}

/**
 * A connection to an ipc-server or a sidecar. `addr` is host:port (also
 * http://host:port) or a Unix socket path. `app` is sent as `ipc-app` metadata: it
 * expands channels written with a leading ':' (':worker' -> '<app>:worker').
 */
class Client {
  constructor(addr = DEFAULT_ADDR, { app, token, protoRoot, credentials } = {}) {
    const ipc = loadIpc(protoRoot);
    this.addr = addr;
    this.app = app;
    this._stub = new ipc.Ipc(grpcTarget(addr), credentials || grpc.credentials.createInsecure());
    this._metadata = new grpc.Metadata();
    if (app) this._metadata.set('ipc-app', app);
    if (token) this._metadata.set('authorization', `Bearer ${token}`);
    this._handlers = new Map();
    this._stopping = false;
    this._running = null;
    this._dispatching = false; // a message is being handled: stop() lets its answer go out first
    this._wake = null;
    /** The subscriber id of run(), once subscribed. */
    this.id = '';
  }

  /**
   * Publish `op` on `channel`; resolves to {id, channel, cursor, duplicate} once
   * stored. `key` is an idempotency key: a key the server saw within its
   * --dedup-window (10 minutes) is not stored again (`duplicate` is true, with the
   * first id and cursor). A broadcast failing with UNAVAILABLE is retried (up to
   * BROADCAST_ATTEMPTS within `timeoutMs`) with a key from its first attempt — a
   * random one when none is given — so a retry is never delivered twice;
   * `retry: false` sends once, without an automatic key.
   */
  async broadcast(channel, op, data, { headers = {}, timeoutMs = DEFAULT_CALL_TIMEOUT_MS, key, retry = true } = {}) {
    if (key === undefined && retry) key = `auto-${crypto.randomBytes(8).toString('hex')}`;
    const request = { channel, op, data: toValue(data), headers, key: key || '' };
    const deadline = Date.now() + timeoutMs;
    for (let attempt = 1; ; attempt += 1) {
      try {
        const response = await this._unary('Broadcast', request, Math.max(deadline - Date.now(), 1));
        return broadcasted(response);
      } catch (error) {
        const pause = 100 * 2 ** attempt;
        const again = retry && error instanceof errors.UnavailableError && !(error instanceof errors.NoRespondersError);
        if (!again || attempt >= BROADCAST_ATTEMPTS || Date.now() + pause >= deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, pause));
      }
    }
  }

  /**
   * Publish many messages on one Publish stream — far cheaper per message than one
   * broadcast each. `messages` is an (async) iterable of {channel, op, data,
   * headers, key}. Yields one answer per message, in order, once stored: a
   * {id, channel, cursor, duplicate} object, or for a message the server refused,
   * the Error broadcast would have thrown (the stream goes on). A failure of the
   * stream itself is thrown. Not retried: give messages keys to resend them safely.
   */
  async *publish(messages) {
    const call = this._stub.Publish(this._metadata);
    const failed = new Promise((_, reject) => call.on('error', (error) => reject(errors.fromGrpcError(error))));
    failed.catch(() => {});
    const writing = (async () => {
      for await (const m of messages) {
        const request = { channel: m.channel || '', op: m.op || '', data: toValue(m.data), headers: m.headers || {}, key: m.key || '' };
        if (!call.write(request)) await new Promise((resolve) => call.once('drain', resolve));
      }
      call.end();
    })();
    writing.catch((error) => call.cancel(String(error)));
    try {
      for await (const answer of call) {
        if (answer.code || answer.error) yield errors.fromGrpcError({ code: answer.code, details: answer.error });
        else yield broadcasted(answer);
      }
    } catch (error) {
      throw errors.fromGrpcError(error);
    }
    await writing;
  }

  /**
   * Ask one subscriber of `target` (a subscriber id or a role channel; '' for the
   * node itself) and resolve to its reply. Rejects with NoRespondersError,
   * DeadlineExceededError, or ReplyError when the reply carries `error` (unless
   * `raiseOnError` is false).
   */
  async sendMsg(target, op, data, { headers = {}, timeoutMs = DEFAULT_SEND_TIMEOUT_MS, raiseOnError = true } = {}) {
    const request = { target, op, data: toValue(data), headers, timeout_ms: Math.max(1, Math.round(timeoutMs)) };
    const response = await this._unary('SendMsg', request, timeoutMs + DEADLINE_SLACK_MS);
    const reply = toMsg(response.reply || {});
    if (reply.error && raiseOnError) throw new errors.ReplyError(reply);
    return reply;
  }

  /** Answer a request seen on a subscription (`msg.reply_to`). */
  async reply(replyTo, { op = '', data, headers = {}, error = '', timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    await this._unary('Reply', { reply_to: replyTo, op, data: toValue(data), headers, error }, timeoutMs);
  }

  /**
   * Connected subscribers, fleet-wide, filtered by app, role and labels. With
   * `channel` (`:` adds the app): only those a broadcast on it would reach, its
   * subscribers and the watchers whose patterns match; nothing is sent.
   */
  async members({ app = '', role = '', labels = {}, channel = '', timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    const response = await this._unary('Members', { app, role, labels, channel }, timeoutMs);
    return response.members.map((member) => ({
      ...member,
      labels: { ...member.labels },
      channels: [...member.channels],
      connected_ms: Number(member.connected_ms),
    }));
  }

  /**
   * Ask every responder of `target` (a role channel or a member id), fleet-wide, and
   * resolve to the ledger naming each one: { id, target, op, state, expected, ok,
   * failed, no_reply, not_ready, skipped, outcomes, waves }, each outcome { member,
   * node, status: 'OK' | 'FAILED' | 'NO_REPLY', reply, wave, duration_ms, detail }.
   * Answers once all answered or `timeoutMs` passed. `labels` keeps responders with
   * every one of them; `dryRun` resolves them and sends nothing ('DRY_RUN'); with
   * `key` a repeat resolves to the first ledger and asks nobody. Rejects with
   * NoRespondersError, or FailedPreconditionError for a key used by another operation.
   */
  async gather(target, op, data, { headers = {}, labels = {}, dryRun = false, key = '', timeoutMs = DEFAULT_SEND_TIMEOUT_MS } = {}) {
    const request = operationRequest(target, op, data, { headers, labels, dryRun, key, timeoutMs });
    return toLedger(await this._unary('Gather', request, timeoutMs + DEADLINE_SLACK_MS));
  }

  /**
   * Ask the responders of `target` in waves of `waveSize` (member-id order): the next
   * wave only once every member of the current one answered and, with
   * `readyTimeoutMs`, came back (subscribed again under its id). Once more than
   * `maxFailures` members are not OK, no wave starts ('STOPPED', the rest 'PENDING').
   * Yields { wave, outcome, ledger }: one event per outcome as it settles, the last
   * one with the whole ledger (as gather's). `timeoutMs` is each member's time to
   * answer; `deadlineMs` (none by default) bounds the whole call; `dryRun` yields the
   * plan only. A rerun with the same `key` resumes, on any replica: members already
   * OK are 'SKIPPED'; it throws AbortedError while a run under the key is still going
   * elsewhere. Leaving the loop (break) cancels the call: no further wave.
   */
  async *rollout(
    target,
    op,
    data,
    {
      headers = {},
      labels = {},
      dryRun = false,
      key = '',
      waveSize = 1,
      maxFailures = 0,
      readyTimeoutMs = 0,
      timeoutMs = DEFAULT_SEND_TIMEOUT_MS,
      deadlineMs,
    } = {},
  ) {
    const request = {
      ...operationRequest(target, op, data, { headers, labels, dryRun, key, timeoutMs }),
      wave_size: waveSize,
      max_failures: maxFailures,
      ready_timeout_ms: readyTimeoutMs,
    };
    const options = deadlineMs === undefined ? {} : { deadline: new Date(Date.now() + deadlineMs) };
    const call = this._stub.Rollout(request, this._metadata, options);
    let ended = false;
    try {
      for await (const pb of call) yield toRolloutEvent(pb);
      ended = true;
    } catch (error) {
      ended = true;
      throw errors.fromGrpcError(error);
    } finally {
      if (!ended) call.cancel();
    }
  }

  /**
   * Take the lock `name` for `ttlMs`, waiting up to `waitMs` for its holder to release
   * it. Resolves to { name, acquired, fence, holder, expires_ms }: not getting the
   * lock is `acquired: false` (with the holder and its expiry), not an error. Give
   * `fence` to the resources the lock protects: it only grows per name.
   */
  async lock(name, { ttlMs, waitMs = 0, timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    return this._lockCall(name, ttlMs, waitMs, 0, timeoutMs);
  }

  /** Extend the lease held with `fence` to `ttlMs` from now; `acquired: false` once lost. */
  async renew(name, fence, { ttlMs, timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    return this._lockCall(name, ttlMs, 0, fence, timeoutMs);
  }

  async _lockCall(name, ttlMs, waitMs, fence, timeoutMs) {
    const request = { name, ttl_ms: ttlMs, wait_ms: waitMs, fence };
    const response = await this._unary('Lock', request, timeoutMs + waitMs);
    return {
      name,
      acquired: response.acquired,
      fence: Number(response.fence),
      holder: response.holder,
      expires_ms: Number(response.expires_ms),
    };
  }

  /** Release the lock held with `fence`; false if that lease was no longer held. */
  async unlock(name, fence, { timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    const response = await this._unary('Unlock', { name, fence }, timeoutMs);
    return response.released;
  }

  /**
   * Draw `cost` tokens from the fleet-wide bucket `name`: `rate` per `intervalMs`
   * (default 1000), up to `burst` (default: rate). Resolves to
   * { allowed, remaining, retry_after_ms }; a refusal is not an error.
   */
  async limit(name, { rate, intervalMs = 0, burst = 0, cost = 0, timeoutMs = DEFAULT_CALL_TIMEOUT_MS } = {}) {
    const request = { name, rate, interval_ms: intervalMs, burst, cost };
    const response = await this._unary('Limit', request, timeoutMs);
    return { allowed: response.allowed, remaining: response.remaining, retry_after_ms: response.retry_after_ms };
  }

  /**
   * Open a stream of the messages of `channels` (names, or patterns with '*' and
   * '>'), of <app>:<role> and <app>:<role>:<tag>, and of requests addressed to this
   * subscriber. `cursor` resumes after that message.
   */
  subscribe({ channels = [], role = '', tag = '', id = '', app = '', labels = {}, cursor = '' } = {}) {
    const request = { channels, role, tag, id, app, labels, cursor };
    return new Subscription(this._stub.Subscribe(request, this._metadata));
  }

  /**
   * Register `handler(msg)` for `op`. For a request, what it returns (or resolves
   * to) is the reply's data, and what it throws becomes the reply's `error`.
   */
  on(op, handler) {
    this._handlers.set(op, handler);
    return this;
  }

  /** Call the handler of `op` in this process (no network). */
  async emit(op, msg = { op }) {
    const handler = this._handlers.get(op);
    if (!handler) throw new Error(`no handler for op '${op}'`);
    return handler(msg);
  }

  /**
   * Subscribe and dispatch each message to its handler, one at a time in arrival
   * order, until stop(). When the stream is cut (server restart, slow-subscriber
   * cut-off) it reconnects with backoff under the same id, from the last cursor.
   * `this.id` is then the subscriber id, to run again under (a worker that restarts).
   */
  async run({ role = '', tag = '', channels = [], id = '', app = '', labels = {}, cursor = '', reconnect = true } = {}) {
    this._stopping = false;
    let backoff = BACKOFF_FIRST_MS;
    while (!this._stopping) {
      const subscription = this.subscribe({ channels, role, tag, id, app, labels, cursor });
      this._running = subscription;
      try {
        for await (const msg of subscription) {
          backoff = BACKOFF_FIRST_MS;
          this._dispatching = true;
          try {
            await this._dispatch(msg);
          } finally {
            this._dispatching = false;
          }
          if (this._stopping) break;
        }
      } catch (error) {
        const cut = error instanceof errors.UnavailableError || error instanceof errors.ResourceExhaustedError;
        if (!reconnect || !cut) throw error;
      } finally {
        subscription.cancel();
      }
      id = subscription.id || id;
      cursor = subscription.cursor || cursor;
      if (!reconnect || this._stopping) break;
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, backoff);
        this._wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this._wake = null;
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
    this._running = null;
  }

  /**
   * Make run() resolve (from a handler, a signal handler, anywhere). A message being
   * handled is answered first, then the subscription ends: a handler of
   * worker:restart can call stop() and its caller still gets the answer.
   */
  stop() {
    this._stopping = true;
    if (this._running && !this._dispatching) this._running.cancel();
    if (this._wake) this._wake();
  }

  /** stop(), without waiting for a handler still running, and close the connection. */
  close() {
    this.stop();
    if (this._running) this._running.cancel();
    this._stub.close();
  }

  _unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + timeoutMs);
      this._stub[method](request, this._metadata, { deadline }, (error, response) => {
        if (error) reject(errors.fromGrpcError(error));
        else resolve(response);
      });
    });
  }

  async _dispatch(msg) {
    if (msg.op === SUBSCRIBED_OP && msg.data) this.id = String(msg.data.id || '');
    if (msg.op === GAP_OP) console.warn(`fleet-ipc: messages were lost before ${msg.cursor}`);
    const handler = this._handlers.get(msg.op);
    if (!msg.reply_to) {
      if (!handler) return;
      try {
        await handler(msg);
      } catch (error) {
        console.error(`fleet-ipc: handler of ${msg.op} failed:`, error);
      }
      return;
    }
    if (!handler) {
      await this._answer(msg, { error: `no handler for op '${msg.op}'` });
      return;
    }
    let result;
    try {
      result = await handler(msg);
    } catch (error) {
      await this._answer(msg, { error: (error && error.message) || String(error) });
      return;
    }
    await this._answer(msg, { data: result });
  }

  async _answer(request, { data, error = '' }) {
    try {
      await this.reply(request.reply_to, { op: request.op, data, error });
    } catch (failure) {
      if (!(failure instanceof errors.NotFoundError)) throw failure;
      console.warn(`fleet-ipc: reply to ${request.op} came too late: the sender stopped waiting`);
    }
  }
}

module.exports = {
  Client,
  Subscription,
  toValue,
  fromValue,
  loadIpc,
  ...errors,
};
