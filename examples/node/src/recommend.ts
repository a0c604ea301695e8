// Call recsvc from Node.js with @grpc/grpc-js and @grpc/proto-loader, typed by proto-loader-gen-types.
//
//   npm ci && npm run build && node dist/recommend.js --target 127.0.0.1:50051 --user 41
//
// Shows: loading the proto with the options that keep the API's field names and defaults, a channel with
// the retry policy the README documents, a deadline on every call, an x-request-id, Recommend (k given
// and k left unset), reading degraded and the versions, RecordEvents with event ids (and what a retried
// call returns), and an INVALID_ARGUMENT error. Prints one `key=value` line per step (the same lines as
// examples/python/recommend.py).
import { randomUUID } from "node:crypto";
import * as path from "node:path";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import type { ProtoGrpcType } from "./generated/recommender";
import type { RecommenderClient } from "./generated/recsvc/v1/Recommender";
import type { RecommendRequest } from "./generated/recsvc/v1/RecommendRequest";
import type { RecommendResponse__Output } from "./generated/recsvc/v1/RecommendResponse";
import type { RecordEventsRequest } from "./generated/recsvc/v1/RecordEventsRequest";
import type { RecordEventsResponse__Output } from "./generated/recsvc/v1/RecordEventsResponse";

// Where recommender.proto lives (this repository's protos/ by default).
const PROTOS = process.env.RECSVC_PROTOS ?? path.resolve(__dirname, "..", "..", "..", "protos");

// The same options as `npm run gen-types`, so the types describe what the loader really produces:
// keepCase: fields keep the proto's snake_case names (user_id), as in the docs and in error details;
//   without it proto-loader renames them to camelCase and a `user_id` key is silently dropped.
// defaults: unset fields come back as their defaults (degraded: false, degraded_reason: "") rather
//   than missing.
// enums: String: event types are their names ("EVENT_TYPE_VIEW"); longs: String: Timestamp seconds are
//   strings rather than lossy numbers.
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS],
};

// The README's client retry policy ("Client retry policy, deploys and overload"): every Recommender
// method is safe to retry; UNAVAILABLE (a server draining in a deploy) and RESOURCE_EXHAUSTED (overload,
// retried no sooner than the server's grpc-retry-pushback-ms) are retried, with throttling so that a
// failing fleet does not get a retry storm. @grpc/grpc-js >= 1.10 supports all of it.
export const RETRY_SERVICE_CONFIG = {
  methodConfig: [{
    name: [{ service: "recsvc.v1.Recommender" }],
    retryPolicy: {
      maxAttempts: 5,
      initialBackoff: "0.05s",
      maxBackoff: "1s",
      backoffMultiplier: 2,
      retryableStatusCodes: ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    },
  }],
  retryThrottling: { maxTokens: 20, tokenRatio: 0.1 },
};

const DEADLINE_MS = 2000;   // per call; the server shares it out among its stages and answers within it

type Unary<Req, Res> = (
  request: Req, metadata: grpc.Metadata, options: grpc.CallOptions, callback: grpc.requestCallback<Res>,
) => grpc.ClientUnaryCall;

interface Reply<Res> {
  reply: Res;
  trailers: grpc.Metadata;
}

// One unary call as a promise, with a deadline and the trailing metadata (where x-request-id comes back).
function call<Req, Res>(method: Unary<Req, Res>, request: Req, metadata = new grpc.Metadata()): Promise<Reply<Res>> {
  return new Promise((resolve, reject) => {
    // The reply (callback) and the trailers (status event) arrive separately: settle once both are in.
    let reply: Res | undefined;
    let trailers: grpc.Metadata | undefined;
    const settle = () => {
      if (reply !== undefined && trailers !== undefined) resolve({ reply, trailers });
    };
    const unary = method(request, metadata, { deadline: Date.now() + DEADLINE_MS }, (err, value) => {
      if (err) {
        reject(err);
      } else {
        reply = value;
        settle();
      }
    });
    unary.on("status", (status: grpc.StatusObject) => {
      trailers = status.metadata;
      settle();
    });
  });
}

function isServiceError(err: unknown): err is grpc.ServiceError {
  return typeof err === "object" && err !== null && "code" in err && "details" in err;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { target: { type: "string", default: "127.0.0.1:50051" }, user: { type: "string", default: "41" } },
  });
  const target = values.target as string;
  const user = values.user as string;

  const definition = protoLoader.loadSync("recsvc/v1/recommender.proto", LOADER_OPTIONS);
  const proto = grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType;
  const client: RecommenderClient = new proto.recsvc.v1.Recommender(target, grpc.credentials.createInsecure(), {
    "grpc.enable_retries": 1,
    "grpc.service_config": JSON.stringify(RETRY_SERVICE_CONFIG),
  });
  const recommend: Unary<RecommendRequest, RecommendResponse__Output> = client.Recommend.bind(client);
  const record: Unary<RecordEventsRequest, RecordEventsResponse__Output> = client.RecordEvents.bind(client);

  try {
    // Recommend with a request id of ours: the server logs it and sends it back in trailing metadata.
    const requestId = `example-${randomUUID().slice(0, 12)}`;
    const metadata = new grpc.Metadata();
    metadata.set("x-request-id", requestId);
    const { reply, trailers } = await call(recommend, { user_id: user, k: 5, exclude_item_ids: ["SKU-in-cart"] },
      metadata);
    console.log(`request_id_echoed=${trailers.get("x-request-id")[0] === requestId}`);
    // degraded: a stage fell back (e.g. the ranker was unreachable); the items are still usable.
    console.log(`recommend k=5 items=${reply.items.length} degraded=${reply.degraded} ` +
      `reason=${JSON.stringify(reply.degraded_reason)} model_version=${reply.model_version} ` +
      `index_version=${reply.index_version}`);
    reply.items.forEach((item, i) => console.log(`  item ${i + 1} ${item.item_id} ${item.score.toFixed(4)}`));

    // k left unset (0): the server's default (10 unless RECSVC_DEFAULT_K says otherwise).
    const byDefault = await call(recommend, { user_id: user });
    console.log(`recommend k=unset items=${byDefault.reply.items.length}`);

    // The user viewed the top item and put it in the cart. Each event carries our own id, so that a
    // retry (ours, or gRPC's under the retry policy) cannot store it twice.
    const now = Date.now();
    const top = reply.items[0].item_id;
    const events: RecordEventsRequest = {
      events: [
        { user_id: user, item_id: top, type: "EVENT_TYPE_VIEW", event_id: randomUUID(),
          timestamp: { seconds: Math.floor(now / 1000), nanos: (now % 1000) * 1e6 } },
        { user_id: user, item_id: top, type: "EVENT_TYPE_CART", event_id: randomUUID() },
      ],
    };
    const first = (await call(record, events)).reply;
    console.log(`record accepted=${first.accepted} duplicates=${first.duplicates}`);
    const again = (await call(record, events)).reply;          // the same call, retried
    console.log(`record_retry accepted=${again.accepted} duplicates=${again.duplicates}`);

    // Seen items are not recommended again.
    const after = (await call(recommend, { user_id: user, k: 5 })).reply;
    console.log(`recommend_after_view top_item_returned=${after.items.some((i) => i.item_id === top)}`);

    // A bad request: INVALID_ARGUMENT, details name the field. Not retried (it would fail again).
    try {
      await call(recommend, { user_id: user, k: -1 });
    } catch (err) {
      if (!isServiceError(err)) throw err;
      console.log(`error code=${grpc.status[err.code]} details=${JSON.stringify(err.details)}`);
    }
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
