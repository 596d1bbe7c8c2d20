// A grpc-js server of the Interop service: `node server.js`.
// Binds 127.0.0.1:0 and prints JSON lines on stdout: {"event": "ready",
// "port": N} once it serves, {"event": "cancelled", "method": M} when a call
// ends without an answer (Sleep's deadline), {"event": "stopping"} on SIGTERM.
'use strict';

const { MESSAGE_LIMITS, emit, grpc, loadInterop } = require('./common');

const ERROR_DATA = Buffer.from([0x00, 0xff, 0x10, 0x80]);

const handlers = {
  Echo(call, callback) {
    callback(null, { value: `echo: ${call.request.value}` });
  },

  Fail(call, callback) {
    const trailing = new grpc.Metadata();
    trailing.add('error-text', 'ascii text');
    trailing.add('error-data-bin', ERROR_DATA);
    const details = call.request.value;
    callback({ code: grpc.status.FAILED_PRECONDITION, details, metadata: trailing });
  },

  EchoMetadata(call, callback) {
    const initial = new grpc.Metadata();
    const trailing = new grpc.Metadata();
    for (const [key, values] of Object.entries(call.metadata.toJSON())) {
      if (key.startsWith('x-echo-')) {
        for (const value of values) {
          initial.add(key, value);
          trailing.add(key.replace('x-echo-', 'x-trailer-'), value);
        }
      }
    }
    call.sendMetadata(initial);
    callback(null, {}, trailing);
  },

  Sleep(call) {
    call.on('cancelled', () => emit({ event: 'cancelled', method: 'Sleep' }));
  },

  Count(call) {
    for (let i = 0; i < call.request.value; i++) {
      call.write({ value: i });
    }
    call.end();
  },

  CountThenFail(call) {
    const count = call.request.value;
    for (let i = 0; i < count; i++) {
      call.write({ value: i });
    }
    const trailing = new grpc.Metadata();
    trailing.add('x-count', String(count));
    const details = `failed after ${count}`;
    call.emit('error', { code: grpc.status.ABORTED, details, metadata: trailing });
  },

  Sum(call, callback) {
    let sum = 0;
    call.on('data', (message) => {
      sum += message.value;
    });
    call.on('end', () => callback(null, { value: sum }));
  },

  PingPong(call) {
    call.on('data', (message) => call.write({ value: message.value.replace('ping', 'pong') }));
    call.on('end', () => call.end());
  },

  Reverse(call, callback) {
    callback(null, { value: Buffer.from(call.request.value).reverse() });
  },
};

const server = new grpc.Server(MESSAGE_LIMITS);
server.addService(loadInterop().service, handlers);
server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    emit({ event: 'error', error: String(err) });
    process.exit(1);
  }
  emit({ event: 'ready', port });
});

// A graceful shutdown: GOAWAY, open calls may finish, then exit 0.
process.on('SIGTERM', () => {
  server.tryShutdown(() => process.exit(0));
  emit({ event: 'stopping' });
});
