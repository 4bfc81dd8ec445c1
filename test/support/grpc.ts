// The gateway's gRPC services as @grpc/grpc-js client constructors, loaded from the repo's
// .proto files with the options the gateway itself uses.
import {
  type GrpcObject,
  loadPackageDefinition,
  type ServiceClientConstructor,
} from "@grpc/grpc-js";
import { loadSync } from "@grpc/proto-loader";
import { PROTO_DIR, PROTO_FILES, PROTO_LOADER_OPTIONS } from "../../src/gateway/grpc.ts";

const pkg = loadPackageDefinition(
  loadSync(
    PROTO_FILES.map((f) => `${PROTO_DIR}${f}`),
    PROTO_LOADER_OPTIONS,
  ),
);

/** KServe v2 `inference.GRPCInferenceService`. */
export const InferenceClient = (pkg["inference"] as GrpcObject)[
  "GRPCInferenceService"
] as ServiceClientConstructor;

/** `expertmesh.v1.Generation` (the server-streaming generate RPC). */
export const GenerationClient = ((pkg["expertmesh"] as GrpcObject)["v1"] as GrpcObject)[
  "Generation"
] as ServiceClientConstructor;
