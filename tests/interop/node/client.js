// A grpc-js client of the Interop service: `node client.js <port> <scenario>`.
// Prints one JSON line with what it saw; exits 1 (with {"error": ...}) when
// the scenario itself could not run.
'use strict';

const { MESSAGE_LIMITS, MiB, emit, grpc, loadInterop, metadataJson, pattern } = require('./common');

const [port, scenario] = process.argv.slice(2);
const Interop = loadInterop();
const client = new Interop(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), MESSAGE_LIMITS);

function unary(method, request, options = {}, metadata = new grpc.Metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, options, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

function status(err) {
  return { code: err.code, details: err.details, metadata: metadataJson(err.metadata) };
}

const scenarios = {
  async unary() {
    const reply = await unary('Echo', { value: 'héllo, wörld ✓' });
    return { reply: reply.value };
  },

  async concurrent() {
    const calls = [];
    for (let i = 0; i < 200; i++) {
      calls.push(unary('Echo', { value: `message ${i}` }));
    }
    const replies = await Promise.all(calls);
    const wrong = replies.filter((reply, i) => reply.value !== `echo: message ${i}`);
    return { replies: replies.length, wrong: wrong.map((reply) => reply.value) };
  },

  async error() {
    try {
      await unary('Fail', { value: 'Ünïcødé fäilure ✗ 100% — ½ done\nsecond line' });
    } catch (err) {
      return status(err);
    }
    throw new Error('Fail succeeded');
  },

  metadata() {
    const metadata = new grpc.Metadata();
    metadata.add('x-echo-text', 'hello interop');
    metadata.add('x-echo-data-bin', Buffer.from([0x00, 0xff, 0x10, 0x80, 0x0d, 0x0a]));
    return new Promise((resolve, reject) => {
      const seen = {};
      const call = client.EchoMetadata({}, metadata, (err) => {
        if (err) {
          reject(err);
        }
      });
      call.on('metadata', (initial) => {
        seen.initial = metadataJson(initial);
      });
      call.on('status', (end) => {
        seen.code = end.code;
        seen.trailing = metadataJson(end.metadata);
        resolve(seen);
      });
    });
  },

  async deadline() {
    const started = Date.now();
    try {
      await unary('Sleep', {}, { deadline: Date.now() + 200 });
    } catch (err) {
      return { code: err.code, elapsed_ms: Date.now() - started };
    }
    throw new Error('Sleep returned');
  },

  serverStream() {
    return new Promise((resolve, reject) => {
      const values = [];
      const call = client.Count({ value: 1000 });
      call.on('data', (message) => values.push(message.value));
      call.on('error', reject);
      call.on('status', (end) => {
        if (end.code === grpc.status.OK) {
          resolve({ code: end.code, values });
        }
      });
    });
  },

  streamError() {
    return new Promise((resolve) => {
      const values = [];
      const call = client.CountThenFail({ value: 10 });
      call.on('data', (message) => values.push(message.value));
      call.on('error', (err) => resolve({ values, ...status(err) }));
      call.on('end', () => resolve({ values, code: grpc.status.OK }));
    });
  },

  clientStream() {
    return new Promise((resolve, reject) => {
      const call = client.Sum((err, reply) => (err ? reject(err) : resolve({ sum: reply.value })));
      for (let i = 1; i <= 100; i++) {
        call.write({ value: i });
      }
      call.end();
    });
  },

  bidi() {
    return new Promise((resolve, reject) => {
      const replies = [];
      const call = client.PingPong();
      let sent = 0;
      const ping = () => call.write({ value: `ping ${sent++}` });
      call.on('data', (message) => {
        replies.push(message.value);
        if (sent < 100) {
          ping(); // the next ping only after the previous pong
        } else {
          call.end();
        }
      });
      call.on('error', reject);
      call.on('status', (end) => {
        if (end.code === grpc.status.OK) {
          resolve({ code: end.code, replies });
        }
      });
      ping();
    });
  },

  async big() {
    const sent = pattern(3 * MiB);
    const reply = await unary('Reverse', { value: sent });
    const expected = Buffer.from(sent).reverse();
    return { received: reply.value.length, matches: Buffer.compare(reply.value, expected) === 0 };
  },

  unimplemented() {
    const identity = (x) => x;
    return new Promise((resolve) => {
      client.makeUnaryRequest(
        '/interop.Interop/Nope',
        identity,
        identity,
        Buffer.alloc(0),
        (err) => resolve(err ? { code: err.code } : { code: grpc.status.OK }),
      );
    });
  },
};

async function main() {
  const run = scenarios[scenario];
  if (!run) {
    throw new Error(`unknown scenario ${scenario}`);
  }
  emit(await run());
}

main()
  .then(() => {
    client.close();
  })
  .catch((err) => {
    emit({ error: String(err && err.stack ? err.stack : err), ...(err.code ? status(err) : {}) });
    client.close();
    process.exitCode = 1;
  });
