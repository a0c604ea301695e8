// Use recsvc with no .proto file at all: fetch its schema over server reflection (grpc.reflection.v1, the
// version current clients ask for) and call Recommend through it. What API explorers and scripts do.
//
//   npm ci && npm run build && node dist/discover.js --target 127.0.0.1:50051 --user 41
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import { GrpcReflection } from "grpc-js-reflection-client";

import type { RecommenderClient } from "./generated/recsvc/v1/Recommender";

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { target: { type: "string", default: "127.0.0.1:50051" }, user: { type: "string", default: "41" } },
  });
  const target = values.target as string;
  const credentials = grpc.credentials.createInsecure();
  const reflection = new GrpcReflection(target, credentials, {}, "v1");

  const services = await reflection.listServices();
  console.log(`services=${[...services].sort().join(",")}`);
  const methods = await reflection.listMethods("recsvc.v1.Recommender");
  console.log(`methods=${methods.map((m) => m.name).join(",")}`);

  // The descriptor the server sent, loaded with the same options as the typed example (see recommend.ts).
  const descriptor = await reflection.getDescriptorBySymbol("recsvc.v1.Recommender");
  const objects = descriptor.getPackageObject({ keepCase: true, longs: String, enums: String, defaults: true });
  const Recommender = ((objects.recsvc as grpc.GrpcObject).v1 as grpc.GrpcObject)
    .Recommender as grpc.ServiceClientConstructor;
  const client = new Recommender(target, credentials) as unknown as RecommenderClient;
  try {
    const reply = await new Promise<{ items: unknown[]; model_version: string }>((resolve, reject) => {
      client.Recommend({ user_id: values.user as string }, { deadline: Date.now() + 2000 },
        (err, value) => (err || value === undefined ? reject(err) : resolve(value)));
    });
    console.log(`recommend k=unset items=${reply.items.length} model_version=${reply.model_version}`);
  } finally {
    client.close();
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
