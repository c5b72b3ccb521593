// A Protégé Reward service in Node.js, written from protos/protege/v1/reward.proto alone.
//
//   npm ci && node server.js --port 50053 [--host 0.0.0.0] [--ready-file F]
//   PROTEGE_TOKEN=secret node server.js ...     # callers must send `authorization: Bearer secret`
//   protege reward check 127.0.0.1:50053 [--token secret]
//
// It scores exact answers: 1 when the completion, trimmed, equals metadata.answer, else 0. Every
// rule of the contract (docs/reward-contract.md) is kept here by hand: call errors are
// INVALID_ARGUMENT, item errors are per-sample statuses with a reason, health stays open without
// a token, and Info states the batch and message limits this server was started with.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { HealthImplementation } = require('grpc-health-check');
const { ReflectionService } = require('@grpc/reflection');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const MAX_BATCH_SIZE = 256;
const MAX_ID_CHARS = 1024;
const MAX_METADATA_CHARS = 4 * 1024 * 1024;
const MAX_METADATA_DEPTH = 64;
const MAX_ERROR_CHARS = 2000;
// What this server accepts, and says so in Info: more than grpc-js's 4 MiB default.
const MAX_REQUEST_BYTES = 16 * 1024 * 1024;
const STATUS = { OK: 1, ERROR: 2, TIMEOUT: 3, INVALID: 4 };

function parseArgs(argv) {
  const args = { host: '127.0.0.1', port: 50053, readyFile: null };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--host') args.host = value;
    else if (flag === '--port') args.port = Number(value);
    else if (flag === '--ready-file') args.readyFile = value;
    else throw new Error(`unknown flag ${flag}; use --host, --port, --ready-file`);
  }
  return args;
}

// The scorer: what a team would replace.
function score(sample, metadata) {
  if (!('answer' in metadata)) throw new Error("metadata has no 'answer'");
  return sample.completion.trim() === String(metadata.answer) ? 1.0 : 0.0;
}

function jsonDepth(text) {
  let depth = 0;
  let deepest = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === '\\') i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === '[' || c === '{') deepest = Math.max(deepest, ++depth);
    else if (c === ']' || c === '}') depth--;
  }
  return deepest;
}

// The sample's metadata as an object, or an Error saying why it is not one (an item ERROR).
function parseMetadata(text) {
  if (text.length > MAX_METADATA_CHARS) {
    return new Error(`metadata_json has ${text.length} characters, more than ${MAX_METADATA_CHARS}`);
  }
  if (jsonDepth(text) > MAX_METADATA_DEPTH) {
    return new Error(`metadata_json nests deeper than ${MAX_METADATA_DEPTH} levels`);
  }
  let value;
  try {
    value = text.trim() ? JSON.parse(text) : {};
  } catch (e) {
    return new Error(`metadata_json is not valid JSON: ${e.message}`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    return new Error(`metadata_json must be a JSON object, got ${Array.isArray(value) ? 'array' : typeof value}`);
  }
  return value;
}

function failed(id, status, message) {
  return { id, status, score: 0, error: String(message).slice(0, MAX_ERROR_CHARS) };
}

function scoreOne(sample, deadline) {
  if (Date.now() >= deadline) return failed(sample.id, STATUS.TIMEOUT, "the call's deadline passed before scoring");
  const metadata = parseMetadata(sample.metadata_json);
  if (metadata instanceof Error) return failed(sample.id, STATUS.ERROR, metadata.message);
  let value;
  try {
    value = score(sample, metadata);
  } catch (e) {
    return failed(sample.id, STATUS.ERROR, `${e.name}: ${e.message}`);
  }
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    return failed(sample.id, STATUS.INVALID, `the scorer returned ${value}; rewards must be finite numbers`);
  }
  return { id: sample.id, status: STATUS.OK, score: value, error: '' };
}

// A call error (INVALID_ARGUMENT) for a batch that breaks the contract, else null.
function batchError(samples) {
  if (samples.length > MAX_BATCH_SIZE) {
    return `batch of ${samples.length} samples exceeds max_batch_size=${MAX_BATCH_SIZE}; split it`;
  }
  const seen = new Set();
  for (const s of samples) {
    if (s.id.length > MAX_ID_CHARS) return `sample id has ${s.id.length} characters; at most ${MAX_ID_CHARS}`;
    if (seen.has(s.id)) return `duplicate sample id ${JSON.stringify(s.id)}: ids must be unique in a batch`;
    seen.add(s.id);
  }
  return null;
}

// UNAUTHENTICATED unless the call carries the token (when one is required). Health is not
// behind this: it is a separate service, open to probes.
function authError(call) {
  const token = process.env.PROTEGE_TOKEN;
  if (!token) return null;
  const sent = call.metadata.get('authorization')[0];
  if (sent === `Bearer ${token}`) return null;
  return { code: grpc.status.UNAUTHENTICATED, details: sent ? 'invalid bearer token' : 'missing bearer token: send `authorization: Bearer <token>`' };
}

const handlers = {
  Info(call, callback) {
    const denied = authError(call);
    if (denied) return callback(denied);
    callback(null, {
      name: 'exact-answer-node', description: '1 if the completion equals metadata.answer, else 0',
      max_batch_size: MAX_BATCH_SIZE, item_timeout_s: 0, max_request_bytes: MAX_REQUEST_BYTES,
    });
  },
  Score(call, callback) {
    const denied = authError(call);
    if (denied) return callback(denied);
    const samples = call.request.samples;
    const problem = batchError(samples);
    if (problem) return callback({ code: grpc.status.INVALID_ARGUMENT, details: problem });
    // Answer a little before the caller's deadline, so it gets explicit TIMEOUTs.
    const callDeadline = call.getDeadline();
    const deadline = callDeadline instanceof Date ? callDeadline.getTime() - 100 : Infinity;
    callback(null, { results: samples.map((s) => scoreOne(s, deadline)) });
  },
};

function main() {
  const args = parseArgs(process.argv.slice(2));
  const definition = protoLoader.loadSync(path.join(PROTOS, 'protege/v1/reward.proto'), {
    keepCase: true, longs: Number, enums: Number, defaults: true, includeDirs: [PROTOS],
  });
  const proto = grpc.loadPackageDefinition(definition);
  const server = new grpc.Server({ 'grpc.max_receive_message_length': MAX_REQUEST_BYTES });
  server.addService(proto.protege.v1.Reward.service, handlers);
  const health = new HealthImplementation({ '': 'SERVING', 'protege.v1.Reward': 'SERVING' });
  health.addToServer(server);
  new ReflectionService(definition).addToServer(server);
  server.bindAsync(`${args.host}:${args.port}`, grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) {
      console.error(`could not bind ${args.host}:${args.port}: ${err.message}`);
      process.exit(1);
    }
    const address = `${args.host === '0.0.0.0' ? '127.0.0.1' : args.host}:${port}`;
    console.log(`reward serving on ${args.host}:${port} (auth=${Boolean(process.env.PROTEGE_TOKEN)})`);
    if (args.readyFile) { // atomically: a watcher never reads half a file
      fs.writeFileSync(`${args.readyFile}.tmp`, JSON.stringify({ grpc: address, pid: process.pid }));
      fs.renameSync(`${args.readyFile}.tmp`, args.readyFile);
    }
  });
  const stop = () => {
    health.setStatus('', 'NOT_SERVING');
    health.setStatus('protege.v1.Reward', 'NOT_SERVING');
    server.tryShutdown(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
