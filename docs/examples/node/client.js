'use strict';
// A session of lstm-serve from Node.js, written from proto/lstm/v1/lstm.proto alone (see docs/clients.md).
//
//   npm ci && node client.js 127.0.0.1:50051 golden_l3_head '[[0.1,0.2,0.3,0.4],[0.5,0.6,0.7,0.8]]'
//
// Asks for the server's limits, opens a session on MODEL, sends the first half of STEPS (a JSON list of input
// vectors) one Step each and the rest over one StreamSteps stream, shows the standard error details of a step with
// a wrong seq, closes the session, and prints one JSON object (outputs as base64 of their float32 bytes, so that they
// can be compared bit for bit). tests/integration/test_clients_doc.py runs it.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const definition = protoLoader.loadSync('lstm/v1/lstm.proto', {
  includeDirs: [path.resolve(__dirname, '../../../proto')],
  keepCase: true, // field names as in the .proto: session_id, not sessionId
  longs: String, // uint64 (seq, steps, expected_seq) as decimal strings: a JS number loses precision past 2^53
  defaults: true,
  oneofs: true, // StepReply.result names the member set: "outputs" or "error"
});
const lstm = grpc.loadPackageDefinition(definition).lstm.v1;

// google.rpc.Status and ErrorInfo, decoded from the grpc-status-details-bin trailer (their field numbers are those of
// google/rpc/status.proto and error_details.proto; Any is google/protobuf/any.proto's).
const rpc = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
`, { keepCase: true }).root;

// A Tensor: float32 little-endian, row-major (the layout the proto's Tensor comment fixes).
function tensor(rows) {
  const flat = rows.flat();
  const data = Buffer.alloc(4 * flat.length);
  flat.forEach((v, i) => data.writeFloatLE(v, 4 * i));
  return { shape: Array.isArray(rows[0]) ? [rows.length, rows[0].length] : [rows.length], data };
}

function unary(client, method, request) {
  const deadline = Date.now() + 10000;
  return new Promise((resolve, reject) =>
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply))),
  );
}

function errorInfo(err) {
  const [raw] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw) return null;
  const status = rpc.lookupType('google.rpc.Status').decode(raw);
  for (const any of status.details) {
    if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
      const info = rpc.lookupType('google.rpc.ErrorInfo').decode(any.value);
      return { code: status.code, reason: info.reason, domain: info.domain, metadata: { ...info.metadata } };
    }
  }
  return { code: status.code };
}

function streamSteps(client, requests) {
  return new Promise((resolve, reject) => {
    const replies = [];
    const call = client.StreamSteps({ deadline: Date.now() + 10000 });
    call.on('data', (reply) => replies.push(reply));
    call.on('error', reject);
    call.on('end', () => resolve(replies));
    for (const request of requests) call.write(request);
    call.end();
  });
}

async function main() {
  const [target, model, stepsJson] = process.argv.slice(2);
  const steps = JSON.parse(stepsJson);
  const client = new lstm.LstmService(target, grpc.credentials.createInsecure());
  try {
    const info = await unary(client, 'GetServerInfo', {});
    const maxInFlight = info.limits.max_stream_requests_in_flight;
    const session = await unary(client, 'CreateSession', { model });
    const id = session.session_id;
    const half = Math.ceil(steps.length / 2);
    const outputs = [];
    let seq = BigInt(session.seq); // "0": seq is a string here (longs: String)
    for (const x of steps.slice(0, half)) {
      seq += 1n;
      const reply = await unary(client, 'Step', { session_id: id, seq: seq.toString(), inputs: tensor(x) });
      outputs.push(reply.outputs.data.toString('base64'));
    }
    let refused = null;
    try {
      await unary(client, 'Step', { session_id: id, seq: (seq + 5n).toString(), inputs: tensor(steps[0]) });
    } catch (err) {
      refused = { grpc_code: err.code, ...errorInfo(err) };
    }
    const rest = steps.slice(half).slice(0, maxInFlight).map((x) => {
      seq += 1n;
      return { session_id: id, seq: seq.toString(), inputs: tensor(x) };
    });
    const replies = await streamSteps(client, rest);
    const streamed = replies.map((r) => (r.result === 'outputs' ? r.outputs.data.toString('base64') : r.error));
    const closed = await unary(client, 'CloseSession', { session_id: id });
    console.log(
      JSON.stringify({
        server_version: info.server_version,
        protocol: info.protocol,
        max_steps_per_request: info.limits.max_steps_per_request,
        outputs: outputs.concat(streamed),
        results: replies.map((r) => r.result),
        refused,
        final_seq: closed.session.seq,
      }),
    );
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
