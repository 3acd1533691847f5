'use strict';
// A pod process on a client generated from proto/ipc/v1/ipc.proto by
// @grpc/proto-loader and @grpc/grpc-js, with a stock `unix:` target and its
// defaults. The same steps as python_client.py and go/main.go, one JSON line per
// step, for any_client.rs to check.
//
//   node node_client.js SOCKET NAME PROTO_ROOT

const path = require('node:path');

// The Node client's own dependencies (clients/node/node_modules).
const modules = path.resolve(__dirname, '../../../clients/node/node_modules');
const grpc = require(path.join(modules, '@grpc/grpc-js'));
const protoLoader = require(path.join(modules, '@grpc/proto-loader'));

const [socket, name, protoRoot] = process.argv.slice(2);
const definition = protoLoader.loadSync('ipc/v1/ipc.proto', {
  includeDirs: [protoRoot],
  keepCase: true,
  defaults: true,
  oneofs: true,
});
const { Ipc } = grpc.loadPackageDefinition(definition).ipc.v1;
const client = new Ipc(`unix:${socket}`, grpc.credentials.createInsecure());
const metadata = () => {
  const m = new grpc.Metadata();
  m.set('ipc-app', 'shop');
  return m;
};
const say = (fields) => console.log(JSON.stringify(fields));
const unary = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata(), { deadline: Date.now() + 15000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    ),
  );

// google.protobuf.Value as proto-loader represents it (protobufjs's bundled
// well-known types keep their camelCase field names), and back.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: { fields: Object.fromEntries(Object.entries(v).map(([k, x]) => [k, toValue(x)])) } };
}
function fromValue(value) {
  if (!value || !value.kind) return null;
  const x = value[value.kind];
  switch (value.kind) {
    case 'structValue':
      return Object.fromEntries(Object.entries(x.fields || {}).map(([k, f]) => [k, fromValue(f)]));
    case 'listValue':
      return (x.values || []).map(fromValue);
    case 'nullValue':
      return null;
    default:
      return x;
  }
}

async function main() {
  say({ pong: (await unary('SendMsg', { op: 'ping' })).reply.op });
  const stream = client.Subscribe(
    { channels: [`:${name}`], id: `${name}-1`, role: `${name}worker` },
    metadata(),
  );
  const messages = stream[Symbol.asyncIterator]();
  say({ subscribed: (await messages.next()).value.op });
  await unary('Broadcast', { channel: `:${name}`, op: `${name}:hello`, data: toValue({ x: 'one' }) });
  for (;;) {
    const msg = (await messages.next()).value;
    if (msg.op === `${name}:hello`) {
      say({ got: fromValue(msg.data), channel: msg.channel });
      break;
    }
  }
  const answer = await unary('SendMsg', {
    target: ':operator',
    op: `${name}:ask`,
    data: toValue({ n: 'two' }),
    timeout_ms: 10000,
  });
  say({ answer: answer.reply.op, data: fromValue(answer.reply.data) });
  for (;;) {
    const msg = (await messages.next()).value;
    if (msg.reply_to) {
      await unary('Reply', { reply_to: msg.reply_to, op: `${name}:answer`, data: msg.data });
      say({ answered: msg.op });
      stream.on('error', () => {}); // the CANCELLED that cancel() causes
      stream.cancel();
      client.close();
      return;
    }
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
