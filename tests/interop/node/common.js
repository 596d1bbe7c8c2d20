// Shared by client.js and server.js: the Interop service and JSON helpers.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const MiB = 1024 * 1024;
// Both sides allow 8 MiB messages: the big-message scenario sends 3 MiB.
const MESSAGE_LIMITS = {
  'grpc.max_receive_message_length': 8 * MiB,
  'grpc.max_send_message_length': 8 * MiB,
};

function loadInterop() {
  const definition = protoLoader.loadSync(path.join(__dirname, 'interop.proto'), {
    keepCase: true,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).interop.Interop;
}

// Metadata as {key: [values]}; -bin values as hex strings.
function metadataJson(metadata) {
  const out = {};
  if (!metadata) {
    return out;
  }
  for (const [key, values] of Object.entries(metadata.toJSON())) {
    out[key] = values.map((value) => (Buffer.isBuffer(value) ? value.toString('hex') : value));
  }
  return out;
}

// The deterministic payload of the big-message scenario: byte i is i % 251.
function pattern(size) {
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i++) {
    data[i] = i % 251;
  }
  return data;
}

function emit(object) {
  process.stdout.write(JSON.stringify(object) + '\n');
}

module.exports = { MESSAGE_LIMITS, MiB, emit, grpc, loadInterop, metadataJson, pattern };
