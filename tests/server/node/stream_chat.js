// Streams one completion from mistral.chat.v1.ChatService with @grpc/grpc-js, loading the .proto
// at run time (as most Node.js services do). Prints each chunk as one JSON line; on an error, prints
// {"error": {"code", "details"}} and exits 1.
//   node stream_chat.js HOST:PORT '<ChatRequest JSON>'
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "proto");

function main() {
  const [target, body] = process.argv.slice(2);
  const definition = protoLoader.loadSync("mistral/chat/v1/chat.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // the proto's snake_case names, as in the OpenAI JSON
    longs: Number,
    defaults: false,
    oneofs: false, // no synthetic oneof fields for proto3 `optional`
  });
  const { ChatService } = grpc.loadPackageDefinition(definition).mistral.chat.v1;
  const client = new ChatService(target, grpc.credentials.createInsecure());
  const call = client.StreamChat(JSON.parse(body), { deadline: Date.now() + 60000 });
  call.on("data", (chunk) => process.stdout.write(JSON.stringify(chunk) + "\n"));
  call.on("error", (error) => {
    process.stdout.write(JSON.stringify({ error: { code: grpc.status[error.code], details: error.details } }) + "\n");
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
