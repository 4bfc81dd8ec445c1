# expertmesh: one image for the operator, gateways and shards (`expertmesh <command>`).
#
#   docker build -t expertmesh .
#   docker build -t expertmesh:cuda --build-arg EM_CUDA=ON \
#     --build-arg RUNTIME_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 .
#
# Stage 1 compiles TypeScript with Node 24 and the native engine (with EM_CUDA=ON also its
# CUDA backend, for sm_90a and sm_80, from a CUDA 13.0 toolkit of PyPI wheels:
# scripts/cuda-toolkit.sh, and CUTLASS's headers for its Hopper grouped GEMM: scripts/cutlass.sh); stage 2 is a slim runtime that gets the Node binary from stage
# 1, so any glibc base works. The CUDA image needs a base with the CUDA 13 runtime
# libraries (cuBLAS; the CUDA runtime is linked statically): pods that request GPUs run
# `--device=cuda:0`, and an addon built without CUDA makes them exit at start with
# EM_NATIVE_UNSUPPORTED.
ARG NODE_IMAGE=node:24-bookworm
ARG RUNTIME_BASE=debian:bookworm-slim

FROM ${NODE_IMAGE} AS build
ARG EM_CUDA=OFF
RUN apt-get update && apt-get install -y --no-install-recommends cmake ninja-build \
    $(if [ "$EM_CUDA" = ON ]; then echo python3-pip; fi) \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
# Dependencies only (our npm scripts bootstrap Node 24 for bare machines; this image has it).
RUN npm ci --ignore-scripts --no-audit --no-fund
# The native engine (C++; node_api.h comes with the image's Node under /usr/local/include).
COPY scripts/cuda-toolkit.sh scripts/cutlass.sh ./scripts/
COPY shards ./shards
RUN if [ "$EM_CUDA" = ON ]; then \
      CUDACXX="$(PIP_BREAK_SYSTEM_PACKAGES=1 EXPERTMESH_CACHE_DIR=/opt/em-cache bash scripts/cuda-toolkit.sh)/bin/nvcc" \
      && EM_CUTLASS_DIR="$(EXPERTMESH_CACHE_DIR=/opt/em-cache bash scripts/cutlass.sh)" \
      && export CUDACXX EM_CUTLASS_DIR; \
    fi \
    && EM_CUDA=$EM_CUDA EM_BUILD_TESTS=OFF EM_NODE=/usr/local/bin/node bash shards/build.sh
COPY tsconfig.json ./
COPY src ./src
RUN npx tsc -p tsconfig.json && npm prune --omit=dev --ignore-scripts

FROM ${RUNTIME_BASE} AS runtime
COPY --from=build /usr/local/bin/node /usr/local/bin/node
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin expertmesh
WORKDIR /app
COPY --from=build /src/package.json ./package.json
COPY --from=build /src/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY --from=build /src/shards/build/expertmesh.node ./shards/build/expertmesh.node
COPY examples ./examples
COPY proto ./proto
USER 10001:10001
ENV NODE_ENV=production
ENTRYPOINT ["/usr/local/bin/node", "/app/dist/cli/main.js"]
CMD ["--help"]
