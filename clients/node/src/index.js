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
// `client.run({ role })`, which answers requests with the handler's result on the same
// stream (a Serve stream: no Reply call per request) and reconnects, resuming from its
// cursor, when the stream is cut.

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
// The notice a Serve stream sends when one of its replies was not delivered: data
// {reply_to, code, error} (code a status name, NOT_FOUND when the requester gave up).
const REPLY_ERROR_OP = 'ipc:reply-error';
// The largest answer sent on the Serve stream. A node decodes stream messages of up to
// 4 MiB whatever its --max-msg-bytes, and one it cannot decode ends the stream; a
// larger answer goes as a Reply call, which fails alone if the node refuses it.
const SERVE_REPLY_MAX = 4 * 1024 * 1024 - 1024;
// JSON text shorter than this encodes below SERVE_REPLY_MAX however it is made up
// (protobuf's Value takes at most ~5.5 bytes per JSON byte, a JSON byte at most 3 per
// character): only longer answers are measured exactly.
const SERVE_REPLY_SURE = Math.floor(SERVE_REPLY_MAX / 17);
// How long stop() waits for the answers already given to be written before it ends
// the stream (any still unwritten then go as Reply calls).
const FLUSH_LIMIT_MS = DEFAULT_CALL_TIMEOUT_MS;
// A refused answer (too large, bad headers): its requester is told so with an error
// answer instead of waiting for its timeout.
const REFUSED_ANSWER_CODES = new Map([
  [grpc.status.RESOURCE_EXHAUSTED, 'RESOURCE_EXHAUSTED'],
  [grpc.status.INVALID_ARGUMENT, 'INVALID_ARGUMENT'],
  [grpc.status.OUT_OF_RANGE, 'OUT_OF_RANGE'],
]);

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
 * The sending side of one Serve call of run(): the answers written on it, and which
 * of them are not known to be written yet (their write callback has not run), to
 * send as Reply calls if the call ends first.
 */
class ServeStream {
  constructor(call) {
    this._call = call;
    this._open = true;
    this._unwritten = new Set();
    this._settled = () => {};
    // Resolves once nothing more can be written: the call ended or was abandoned.
    this._ended = new Promise((resolve) => {
      this._end = resolve;
    });
    call.on('status', () => this._end());
    call.on('error', () => this._end()); // also read by the subscription's iterator
  }

  /** Writes `reply`; false once the stream takes no more answers. Waits while the connection is behind. */
  async send(reply) {
    if (!this._open) return false;
    this._unwritten.add(reply);
    const more = this._call.write({ reply }, () => {
      this._unwritten.delete(reply);
      if (!this._unwritten.size) this._settled();
    });
    if (!more) await Promise.race([new Promise((resolve) => this._call.once('drain', resolve)), this._ended]);
    return true;
  }

  /** Takes no more answers, waits up to `limitMs` for those given to be written, and returns the ones that were not. */
  async finish(limitMs) {
    if (this._open) {
      this._open = false;
      this._call.end();
    }
    let timer;
    const written = new Promise((resolve) => {
      this._settled = resolve;
      if (!this._unwritten.size) resolve();
    });
    const late = new Promise((resolve) => {
      timer = setTimeout(resolve, limitMs);
    });
    await Promise.race([written, this._ended, late]);
    clearTimeout(timer);
    return this.abandon();
  }

  /** The call ended: the answers not known to be written. */
  abandon() {
    this._open = false;
    const unwritten = [...this._unwritten];
    this._unwritten.clear();
    this._end();
    return unwritten;
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
    this._serve = null; // the sending side of run()'s Serve stream open now, where answers go
    this._serving = true; // false once a node answered Serve with UNIMPLEMENTED
    this._inFlight = 0; // messages being handled: stop() lets their answers go out first
    this._ending = null; // a stream of run() being ended by stop() or a handler
    this._told = []; // requests told their answer was refused (the last 256)
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
   * order, until stop(); with `concurrency` N, up to N handlers run at once (reading
   * waits while N are running). The subscription is a Serve stream: answers travel
   * back on it, in the order handlers finish, instead of as one Reply call each.
   * When the stream is cut (server restart, slow-subscriber cut-off) it reconnects
   * with backoff under the same id, from the last cursor; an answer given while no
   * stream is open, or not yet written when one was cut, goes as a Reply call.
   * `this.id` is then the subscriber id, to run again under (a worker that restarts).
   */
  async run({ role = '', tag = '', channels = [], id = '', app = '', labels = {}, cursor = '', reconnect = true, concurrency = 1 } = {}) {
    if (!(concurrency >= 1)) throw new RangeError(`concurrency must be at least 1, not ${concurrency}`);
    this._stopping = false;
    let backoff = BACKOFF_FIRST_MS;
    const handling = new Set();
    while (!this._stopping) {
      const { subscription, serve } = this._open({ channels, role, tag, id, app, labels, cursor });
      this._running = subscription;
      this._serve = serve;
      try {
        for await (const msg of subscription) {
          // Stopping: nothing new is handled, and the stream ends (cancelled by
          // _endWhenIdle) once the handlers answered. Leaving the loop would cancel
          // it at once, before the answers given on it are written.
          if (this._stopping) continue;
          backoff = BACKOFF_FIRST_MS;
          if (msg.op === SUBSCRIBED_OP && msg.data) this.id = String(msg.data.id || '');
          this._inFlight += 1;
          const dispatched = this._dispatch(msg)
            .catch((error) => console.error(`fleet-ipc: dispatching ${msg.op} failed:`, error))
            .finally(() => {
              this._inFlight -= 1;
              handling.delete(dispatched);
              this._endWhenIdle();
            });
          handling.add(dispatched);
          if (handling.size >= concurrency) await Promise.race(handling);
        }
      } catch (error) {
        if (serve && error.code === grpc.status.UNIMPLEMENTED && !subscription.id) {
          this._serving = false; // an older node: Subscribe, and answers as Reply calls
          continue;
        }
        const cut = error instanceof errors.UnavailableError || error instanceof errors.ResourceExhaustedError;
        if (!reconnect || !cut) throw error;
      } finally {
        // Stopping: every handler still running answers before the stream ends.
        if (this._stopping) await Promise.all(handling);
        if (this._running === subscription) {
          this._running = null;
          this._serve = null;
          await this._endStream(subscription, serve, this._stopping);
        }
        if (this._ending) await this._ending;
        this._ending = null;
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
    await Promise.all(handling);
    this._running = null;
  }

  /**
   * Make run() resolve (from a handler, a signal handler, anywhere). A message being
   * handled is answered first, then the subscription ends: a handler of
   * worker:restart can call stop() and its caller still gets the answer. Answers
   * given from then on go as Reply calls, each confirmed by the node, and those
   * already given on the stream are written before it ends.
   */
  stop() {
    this._stopping = true;
    this._endWhenIdle();
    if (this._wake) this._wake();
  }

  /** stop(), without waiting for a handler still running, and close the connection. */
  close() {
    this.stop();
    if (this._running) {
      if (this._serve) this._serve.abandon();
      this._running.cancel();
      this._running = null;
      this._serve = null;
    }
    this._stub.close();
  }

  /** The next stream of run(): Serve, or Subscribe on a node without Serve. */
  _open(request) {
    if (!this._serving) return { subscription: this.subscribe(request), serve: null };
    const call = this._stub.Serve(this._metadata);
    const serve = new ServeStream(call);
    call.write({ subscribe: request });
    return { subscription: new Subscription(call), serve };
  }

  /** Once stopping and no handler runs: ends run()'s stream. */
  _endWhenIdle() {
    if (!this._stopping || this._inFlight || !this._running) return;
    const [subscription, serve] = [this._running, this._serve];
    this._running = null;
    this._serve = null;
    this._ending = this._endStream(subscription, serve, true);
  }

  /**
   * Ends a stream of run(). With `flush` (stopping) the answers given on it are
   * written first; those that could not be (a stream that broke) go as Reply calls
   * before it is cancelled, while their requests may still wait.
   */
  async _endStream(subscription, serve, flush) {
    let unwritten = [];
    if (serve) unwritten = flush ? await serve.finish(FLUSH_LIMIT_MS) : serve.abandon();
    for (const reply of unwritten) await this._replyCall(reply);
    subscription.cancel();
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
    if (msg.op === GAP_OP) console.warn(`fleet-ipc: messages were lost before ${msg.cursor}`);
    if (msg.op === REPLY_ERROR_OP && !msg.cursor) await this._notDelivered(msg);
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
    let value;
    let size = 0;
    try {
      value = toValue(data);
      size = data === undefined ? 0 : JSON.stringify(data).length;
    } catch (failure) {
      value = undefined;
      error = `the answer of '${request.op}' is not JSON data: ${failure.message}`;
    }
    await this._sendAnswer({ reply_to: request.reply_to, op: request.op, data: value, headers: {}, error }, size);
  }

  /**
   * On the Serve stream open now; as a Reply call when there is none, when stopping
   * (confirmed before the stream ends) or when it is too large for the stream.
   * `jsonSize` is the length of the data as JSON text.
   */
  async _sendAnswer(reply, jsonSize = 0) {
    const serve = this._stopping ? null : this._serve;
    const fits = jsonSize < SERVE_REPLY_SURE || this._stub.Reply.requestSerialize(reply).length <= SERVE_REPLY_MAX;
    if (serve && fits && (await serve.send(reply))) return;
    await this._replyCall(reply);
  }

  async _replyCall(reply) {
    try {
      await this._unary('Reply', reply, DEFAULT_CALL_TIMEOUT_MS);
    } catch (failure) {
      if (failure instanceof errors.NotFoundError) {
        console.warn(`fleet-ipc: reply to ${reply.op} came too late: the sender stopped waiting`);
      } else if (REFUSED_ANSWER_CODES.has(failure.code)) {
        await this._tellRequester(reply.reply_to, failure.details || failure.message);
      } else {
        console.warn(`fleet-ipc: answer to ${reply.op} not delivered: ${failure.message}`);
      }
    }
  }

  /** An ipc:reply-error notice: an answer sent on the stream was not delivered. */
  async _notDelivered(notice) {
    const { reply_to: replyTo = '', code = '', error = '' } = notice.data || {};
    if (code === 'NOT_FOUND') {
      console.warn(`fleet-ipc: reply to ${replyTo} came too late: the sender stopped waiting`);
    } else if (replyTo && [...REFUSED_ANSWER_CODES.values()].includes(code)) {
      await this._tellRequester(replyTo, error);
    } else {
      console.warn(`fleet-ipc: answer to ${replyTo} not delivered: ${code} ${error}`);
    }
  }

  /**
   * The node refused an answer (too large, bad headers): its requester gets an error
   * answer saying why, rather than waiting for its timeout (once per request).
   */
  async _tellRequester(replyTo, why) {
    if (this._told.includes(replyTo)) {
      console.warn(`fleet-ipc: answer to ${replyTo} not delivered: ${why}`);
      return;
    }
    this._told.push(replyTo);
    if (this._told.length > 256) this._told.shift();
    console.warn(`fleet-ipc: the node refused an answer (${why}); its requester is told so`);
    await this._sendAnswer({ reply_to: replyTo, op: '', headers: {}, error: `answer not delivered: ${why}` });
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
